-- Drops addresses the cloud no longer holds (found by the worker's resync). Allocated addresses
-- are never dropped: they are reported back instead. ARGV[3..] addresses.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local removed, still = {}, {}
for i = 3, #ARGV do
  local ip = ARGV[i]
  local f = family_of(ip)
  if redis.call('HEXISTS', K_ALLOC[f], ip) == 1 then
    still[#still + 1] = ip
  elseif redis.call('HDEL', K_ADDRS[f], ip) == 1 then
    redis.call('ZREM', K_FREE[f], ip)
    redis.call('HDEL', K_RESERVED[f], ip)
    removed[#removed + 1] = ip
  end
end
return ok({removed = removed, still_allocated = still}, now)
