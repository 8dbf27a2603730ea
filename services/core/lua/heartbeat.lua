-- A worker's heartbeat: its name ARGV[1] with the time its heartbeat expires, by Redis's clock
-- (now + ARGV[2] ms), as its score in the sorted set KEYS[1]. Heartbeats already expired are
-- dropped on the way, so the set holds only workers that may still be alive.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
