-- Allocates one specific address. ARGV[3] ip, [4] owner, [5] idempotency key ("" = none).
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local ip, owner, idem = ARGV[3], ARGV[4], ARGV[5] or ''
local f = family_of(ip)
if f == '6' and node_setting('ipv6_enabled') ~= '1' then return fail('IPV6_DISABLED') end
local vpc = redis.call('HGET', K_NODE, 'vpc_cidrs') or ''
if idem ~= '' then
  if cancelled(idem) then return fail('CALL_CANCELLED') end
  local held = keyed(idem)
  if held then
    -- A retry gets what the first try took; any other use of the key is refused.
    local h = held[1]
    if #held > 1 or h.ip ~= ip or h.owner ~= owner then return fail('IDEMPOTENCY_KEY_IN_USE') end
    return ok({allocations = {describe(ip, f, owner, h.uuid)}, replayed = true, vpc = vpc}, now)
  end
end
local current = redis.call('HGET', K_ALLOC[f], ip)
if current then
  local o = unpack_alloc(current)
  return fail('IP_ALREADY_ALLOCATED', {owner = o})
end
if not attached(ip, f) then return fail('IP_NOT_IN_POOL') end
if redis.call('HEXISTS', K_EXCLUDED, ip) == 1 then return fail('IP_EXCLUDED') end
if redis.call('HEXISTS', K_RESERVED[f], ip) == 1 then return fail('IP_RESERVED_FOR_RELEASE') end
-- The cooldown binds a named address too: conntrack and kube-proxy may still route to its last owner.
local freed = redis.call('ZSCORE', K_FREE[f], ip)
if COOLDOWN_MS > 0 and freed and tonumber(freed) > now - COOLDOWN_MS then return fail('IP_COOLING_DOWN') end
if f == '6' and not freed and redis.call('HEXISTS', K_ADDRS['6'], ip) == 0 then
  redis.call('HINCRBY', K_PREFIX6, 'held', 1)  -- a /80's address handed out for the first time (by name)
end
free_remove(f, ip)
redis.call('HSET', K_ALLOC[f], ip, owner .. '\t\t' .. idem)
owners_add(owner, ip)
if idem ~= '' then redis.call('HSET', K_IDEM, idem, ip) end
return ok({allocations = {describe(ip, f, owner, '')}, replayed = false, vpc = vpc}, now)
