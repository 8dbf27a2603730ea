-- Drops addresses the cloud no longer holds (found by the worker's resync). An allocated address
-- stays allocated to its owner (who is told by the node's status), but it is no longer attached:
-- it is marked lost, and its release never puts it back in the free set. A prefix gone (an IPv4 /28
-- or the pool's IPv6 /80) takes all its addresses along, by the same rule; an address of a prefix
-- still held is never dropped alone. ARGV[3] fencing token, [4] prefixes gone (space-separated),
-- [5..] addresses.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
if stale_token(ARGV[3]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local removed, still, newly_lost, removed_prefixes = {}, {}, {}, {}

-- An address leaving: lost when allocated, else out of the free set and of any reservation.
local function drop(ip, f)
  if redis.call('HEXISTS', K_ALLOC[f], ip) == 1 then
    still[#still + 1] = ip
    if redis.call('HSETNX', K_LOST, ip, now) == 1 then newly_lost[#newly_lost + 1] = ip end
  elseif redis.call('ZREM', K_FREE[f], ip) == 1 or redis.call('HDEL', K_RESERVED[f], ip) == 1 then
    removed[#removed + 1] = ip
  end
end

for _, p in ipairs(words(ARGV[4])) do
  if string.find(p, ':', 1, true) then
    if redis.call('HGET', K_PREFIX6, 'cidr') == p then
      -- Only the /80's addresses handed out are in Redis: those allocated and those free again.
      for _, ip in ipairs(redis.call('HKEYS', K_ALLOC['6'])) do
        if redis.call('HEXISTS', K_ADDRS['6'], ip) == 0 and prefix6_of(ip) then drop(ip, '6') end
      end
      for _, ip in ipairs(redis.call('ZRANGE', K_FREE['6'], 0, -1)) do
        if redis.call('HEXISTS', K_ADDRS['6'], ip) == 0 and prefix6_of(ip) then drop(ip, '6') end
      end
      redis.call('DEL', K_PREFIX6)
      prefix6_read = false
      removed_prefixes[#removed_prefixes + 1] = p
    end
  elseif redis.call('HEXISTS', K_PREFIXES, p) == 1 then
    for _, ip in ipairs(prefix_ips(p)) do drop(ip, '4') end
    redis.call('HDEL', K_PREFIXES, p)
    redis.call('ZREM', K_PFREE, p)
    removed_prefixes[#removed_prefixes + 1] = p
  end
end

for i = 5, #ARGV do
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
return ok({removed = removed, still_allocated = still, newly_lost = newly_lost, removed_prefixes = removed_prefixes},
          now)
