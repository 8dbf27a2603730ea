-- Takes one token of an EC2 token bucket shared by every worker replica (KEYS[1]: its hash).
-- ARGV: rate (tokens/s at full speed), burst, reserve (tokens this caller's priority must leave),
-- recover (rate factor regained per second), ttl_ms.
-- The rate factor is the AIMD state: a throttled answer halves it (bucket_throttled.lua), it
-- climbs back by `recover` per second. Redis's own clock, so every replica sees the same time.
-- Returns {granted 0/1, seconds to wait before trying again, tokens left, rate factor}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserve, recover = tonumber(ARGV[3]), tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'factor')
local tokens = tonumber(h[1]) or burst
local at = tonumber(h[2]) or now
local factor = tonumber(h[3]) or 1
local dt = math.max(now - at, 0)
factor = math.min(1, factor + dt * recover)
tokens = math.min(burst, tokens + dt * rate * factor)
local granted, wait = 0, 0
if tokens - 1 >= reserve then
  tokens = tokens - 1
  granted = 1
else
  wait = (reserve + 1 - tokens) / (rate * factor)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now), 'factor', tostring(factor))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {granted, tostring(wait), tostring(tokens), tostring(factor)}
