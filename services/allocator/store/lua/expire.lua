-- Releases addresses whose timer is due. ARGV[3] most to handle in one call.
-- Returns the released addresses and the next deadline (ms, 0 = none).
if redis.call('EXISTS', K_NODE) == 0 then return fail('NODE_NOT_FOUND') end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local released = {}
for _, ip in ipairs(due) do
  local v = redis.call('HGET', K_ALLOC[family_of(ip)], ip)
  local _, uuid = nil, ''
  if v then _, uuid = unpack_alloc(v) end
  if uuid ~= '' and release_ip(ip, now) then released[#released + 1] = ip
  else redis.call('ZREM', K_EXP, ip) end
end
local next_due = redis.call('ZRANGE', K_EXP, 0, 0, 'WITHSCORES')
local next_ms = 0
if #next_due > 0 then next_ms = tonumber(next_due[2]) end
return ok({released = released, next_ms = next_ms}, now)
