-- Drops addresses the cloud no longer holds (found by the worker's resync). An allocated address
-- stays allocated to its owner (who is told by the node's status), but it is no longer attached:
-- it is marked lost, and its release never puts it back in the free set. ARGV[3] fencing token,
-- [4..] addresses.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
if stale_token(ARGV[3]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local removed, still, newly_lost = {}, {}, {}
for i = 4, #ARGV do
  local ip = ARGV[i]
  local f = family_of(ip)
  if redis.call('HEXISTS', K_ADDRS[f], ip) == 0 and (f == '4' and prefix_of(ip) or f == '6' and prefix6_of(ip)) then
    -- An address of a prefix leaves the pool only with its whole prefix.
  elseif redis.call('HEXISTS', K_ALLOC[f], ip) == 1 then
    still[#still + 1] = ip
    redis.call('HDEL', K_ADDRS[f], ip)
    if redis.call('HSETNX', K_LOST, ip, now) == 1 then newly_lost[#newly_lost + 1] = ip end
  elseif redis.call('HDEL', K_ADDRS[f], ip) == 1 then
    redis.call('ZREM', K_FREE[f], ip)  -- a single address: no prefix to count it for
    redis.call('HDEL', K_RESERVED[f], ip)
    removed[#removed + 1] = ip
  end
end
return ok({removed = removed, still_allocated = still, newly_lost = newly_lost}, now)
