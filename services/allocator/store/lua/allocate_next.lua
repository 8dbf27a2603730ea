-- ARGV[3] families ("4", "6" or "64"), [4] owner, [5] idempotency key, [6] expiration ms (0 = none),
-- [7] uuid for the IPv4 timer, [8] uuid for the IPv6 timer.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local owner, idem, expiration_ms = ARGV[4], ARGV[5], tonumber(ARGV[6])
local timer_uuid = {['4'] = ARGV[7], ['6'] = ARGV[8]}

-- Dual-stack ("64") means the families enabled on the allocator and on the node.
local families = ARGV[3]
if node_setting('ipv6_enabled') ~= '1' then
  if string.len(families) > 1 then families = '4'
  elseif families == '6' then return fail('IPV6_DISABLED') end  -- refused: no refill would ever come
end

if idem ~= '' then
  if cancelled(idem) then return fail('CALL_CANCELLED') end
  local held = keyed(idem)
  if held then
    -- A retry: the same owner asking for the same families gets what the first try took.
    local out, got = {}, {}
    for _, h in ipairs(held) do
      if h.owner ~= owner then return fail('IDEMPOTENCY_KEY_IN_USE') end
      got[h.f] = true
      out[#out + 1] = describe(h.ip, h.f, h.owner, h.uuid)
    end
    for f in string.gmatch(families, '%d') do
      if not got[f] then return fail('IDEMPOTENCY_KEY_IN_USE') end
      got[f] = nil
    end
    if next(got) then return fail('IDEMPOTENCY_KEY_IN_USE') end
    return ok({allocations = out, replayed = true, vpc = redis.call('HGET', K_NODE, 'vpc_cidrs') or ''}, now)
  end
end

-- Pick every family first, so a dual-stack call takes both addresses or none.
local cutoff = now - COOLDOWN_MS
local picks = {}
for f in string.gmatch(families, '%d') do
  local r = redis.call('ZRANGEBYSCORE', K_FREE[f], '-inf', cutoff, 'LIMIT', 0, 1)
  if #r == 0 then
    local st = pool_state(now)
    return fail('POOL_EMPTY', {family = f, cooling = redis.call('ZCARD', K_FREE[f]), state = st,
                               reason_hint = redis.call('HGET', K_NODE, 'deficit_reason') or ''})
  end
  picks[#picks + 1] = {f, r[1]}
end

local out, taken = {}, {}
for _, p in ipairs(picks) do
  local f, ip = p[1], p[2]
  local uuid = ''
  redis.call('ZREM', K_FREE[f], ip)
  if expiration_ms > 0 then
    uuid = timer_uuid[f]
    redis.call('ZADD', K_EXP, now + expiration_ms, ip)
  end
  redis.call('HSET', K_ALLOC[f], ip, owner .. '\t' .. uuid .. '\t' .. idem)
  owners_add(owner, ip)
  out[#out + 1] = describe(ip, f, owner, uuid)
  taken[#taken + 1] = ip
end
if idem ~= '' then redis.call('HSET', K_IDEM, idem, table.concat(taken, ' ')) end
return ok({allocations = out, replayed = false, vpc = redis.call('HGET', K_NODE, 'vpc_cidrs') or ''}, now)
