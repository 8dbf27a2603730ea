-- Releases by address or by owner. ARGV[3] "ip" or "owner", [4] the value.
-- Answers flat values (redis_store.release reads them): a failure's reason first, else "", the
-- number of addresses released, each of them, then the pool state when it may need an event.
local node = node_fields()
if not node then return {'NODE_NOT_FOUND'} end
local mode, value = ARGV[3], ARGV[4]
local released = {}
local failure
if mode == 'ip' then
  if release_ip(value, clock()) then released[1] = value else failure = 'IP_NOT_ALLOCATED' end
else
  local ips = words(redis.call('HGET', K_OWNERS, value))
  for _, ip in ipairs(ips) do
    if release_ip(ip, clock(), true) then released[#released + 1] = ip end
  end
  if #ips == 0 then failure = 'OWNER_NOT_FOUND' else redis.call('HDEL', K_OWNERS, value) end
end
if failure then
  if redis.call('SISMEMBER', K_POOLS, POOL) == 0 then return {'POOL_NOT_FOUND'} end
  return {failure}
end
local out = {'', #released}
for _, ip in ipairs(released) do out[#out + 1] = ip end
local st = state_if_needed(node, clock)
if st then return append_state(out, st) end
return out
