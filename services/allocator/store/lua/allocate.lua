-- Allocates one specific address. ARGV[3] ip, [4] owner.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local ip, owner = ARGV[3], ARGV[4]
local f = family_of(ip)
if f == '6' and redis.call('HGET', K_NODE, 'v6') ~= '1' then return fail('IPV6_DISABLED') end
local current = redis.call('HGET', K_ALLOC[f], ip)
if current then
  local o = unpack_alloc(current)
  return fail('IP_ALREADY_ALLOCATED', {owner = o})
end
if redis.call('HEXISTS', K_ADDRS[f], ip) == 0 then return fail('IP_NOT_IN_POOL') end
if redis.call('HEXISTS', K_EXCLUDED, ip) == 1 then return fail('IP_EXCLUDED') end
if redis.call('HEXISTS', K_RESERVED[f], ip) == 1 then return fail('IP_RESERVED_FOR_RELEASE') end
redis.call('ZREM', K_FREE[f], ip)
redis.call('HSET', K_ALLOC[f], ip, owner .. '\t\t')
owners_add(owner, ip)
return ok({allocations = {describe(ip, f, owner, '')}, vpc = redis.call('HGET', K_NODE, 'vpc_cidrs') or ''}, now)
