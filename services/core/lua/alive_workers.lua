-- The workers whose heartbeat (sorted set KEYS[1], see heartbeat.lua) has not expired by Redis's
-- clock: name, ms left, name, ms left, ... Reads only.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #found, 2 do
  out[#out + 1] = found[i]
  out[#out + 1] = math.floor(tonumber(found[i + 1]) - now)
end
return out
