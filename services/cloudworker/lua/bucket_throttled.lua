-- EC2 answered RequestLimitExceeded for a call of this bucket (KEYS[1]): multiplicative decrease.
-- ARGV: rate, burst, recover (as bucket_take.lua), decrease (factor kept, e.g. 0.5), min_factor, ttl_ms.
-- The bucket is emptied too: the account's real bucket is, and every replica should wait.
-- Returns the new rate factor.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, recover = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'factor')
local tokens = tonumber(h[1]) or burst
local at = tonumber(h[2]) or now
local factor = tonumber(h[3]) or 1
local dt = math.max(now - at, 0)
factor = math.min(1, factor + dt * recover)
tokens = math.min(burst, tokens + dt * rate * factor)
factor = math.max(tonumber(ARGV[5]), factor * tonumber(ARGV[4]))
tokens = math.min(tokens, 0)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now), 'factor', tostring(factor))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return tostring(factor)
