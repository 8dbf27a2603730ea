-- The fencing token of a node lock just taken: above the node's newest (KEYS[1]'s field 'fence'),
-- and at least Redis's clock in ms, so that a token whose issue was lost with a failed master is
-- still passed by the next holder's, taken after the promotion. Recorded as the node's newest at
-- once: the former holder's changes are refused from now on. 0 for a node that does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = math.max(now, (tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') or 0) + 1)
redis.call('HSET', KEYS[1], 'fence', string.format('%.0f', token))
return string.format('%.0f', token)
