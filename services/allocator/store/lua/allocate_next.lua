-- ARGV[3] families ("4", "6" or "64"), [4] owner, [5] idempotency key, [6] expiration ms (0 = none),
-- [7] uuid for the IPv4 timer, [8] uuid for the IPv6 timer.
-- Answers flat values (redis_store.allocate_next reads them): a failure's reason first, else "",
-- replayed (0/1), the VPC CIDRs, the number of allocations, 6 values for each (ip, family, owner,
-- uuid, interface id, interface info), then the pool state when it may need an event.
local node = node_fields()
if not node then return {'NODE_NOT_FOUND'} end
local owner, idem, expiration_ms = ARGV[4], ARGV[5], tonumber(ARGV[6])

-- Dual-stack ("64") means the families enabled on the allocator and on the node.
local families = ARGV[3]
if node.v6 ~= '1' then
  if string.len(families) > 1 then families = '4'
  elseif families == '6' then
    -- refused: no refill would ever come
    if redis.call('SISMEMBER', K_POOLS, POOL) == 0 then return {'POOL_NOT_FOUND'} end
    return {'IPV6_DISABLED'}
  end
end

if idem ~= '' then
  local prior = redis.call('HGET', K_IDEM, idem)
  if prior == CANCELLED then
    redis.call('HDEL', K_IDEM, idem)  -- a call's script runs once
    return {'CALL_CANCELLED'}
  end
  local held = keyed(idem, prior)
  if held then
    -- A retry: the same owner asking for the same families gets what the first try took.
    local out, got = {'', 1, node.vpc, #held}, {}
    for _, h in ipairs(held) do
      if h.owner ~= owner then return {'IDEMPOTENCY_KEY_IN_USE'} end
      got[h.f] = true
      append_allocation(out, h.ip, h.f, h.owner, h.uuid)
    end
    for f in string.gmatch(families, '%d') do
      if not got[f] then return {'IDEMPOTENCY_KEY_IN_USE'} end
      got[f] = nil
    end
    if next(got) then return {'IDEMPOTENCY_KEY_IN_USE'} end
    return out  -- a replay changes nothing: no pool state
  end
end

-- Pick every family first, so a dual-stack call takes both addresses or none. IPv4 comes from the
-- pool's prefixes first (take_from_prefixes), then from its single addresses: those stay free to be
-- given back to the cloud first, so the node drifts towards whole prefixes. A single address is the
-- one that became free first, if its cooldown is over (then no other is); it is never a prefix's
-- (take_from_prefixes would have taken a prefix's address out of its cooldown). IPv6 comes from the
-- free set first, then from the pool's /80 (prefix6_next), the cursor moved only once every family
-- has its address.
local picks = {}
for i = 1, #families do
  local f = string.sub(families, i, i)
  local ip, freed, prefix
  if f == '4' then ip, freed, prefix = take_from_prefixes(clock) end
  if not ip then
    local popped = redis.call('ZPOPMIN', K_FREE[f])
    if #popped > 0 and COOLDOWN_MS > 0 and tonumber(popped[2]) > clock() - COOLDOWN_MS then
      redis.call('ZADD', K_FREE[f], popped[2], popped[1])
      popped = {}
    end
    ip, freed = popped[1], popped[2]
  end
  local offset
  if not ip and f == '6' then ip, offset = prefix6_next() end  -- the /80's next, once none is free
  if not ip then
    for _, p in ipairs(picks) do
      if not p[4] then free_add(p[1], p[3], p[2]) end  -- taken back: none or all
    end
    if redis.call('SISMEMBER', K_POOLS, POOL) == 0 then return {'POOL_NOT_FOUND'} end
    return append_state({'POOL_EMPTY', f, redis.call('ZCARD', K_FREE[f]), node.reason}, pool_state(clock(), node))
  end
  picks[#picks + 1] = {f, ip, freed, offset, prefix}
end

local out, taken = {'', 0, node.vpc, #picks}, {}
for _, p in ipairs(picks) do
  local f, ip = p[1], p[2]
  local uuid = ''
  if p[4] then prefix6_advance(p[4]) end
  if expiration_ms > 0 then
    if f == '4' then uuid = ARGV[7] else uuid = ARGV[8] end
    redis.call('ZADD', K_EXP, clock() + expiration_ms, ip)
  end
  redis.call('HSET', K_ALLOC[f], ip, owner .. '\t' .. uuid .. '\t' .. idem)
  owners_add(owner, ip)
  append_allocation(out, ip, f, owner, uuid, p[5])
  taken[#taken + 1] = ip
end
if idem ~= '' then redis.call('HSET', K_IDEM, idem, table.concat(taken, ' ')) end
local st = state_if_needed(node, clock)
if st then return append_state(out, st) end
return out
