-- Releases every address allocated under one idempotency key. ARGV[3] the key.
-- Nothing held under it is no error: a caller's DEL may come twice, or after the address expired.
-- The allocations are scanned rather than the key index, whose layout belongs to allocate_next.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local key = ARGV[3]
local released = {}
for _, f in ipairs({'4', '6'}) do
  local entries = redis.call('HGETALL', K_ALLOC[f])
  for i = 1, #entries, 2 do
    local _, _, idem = unpack_alloc(entries[i + 1])
    if idem == key then released[#released + 1] = entries[i] end
  end
end
for _, ip in ipairs(released) do release_ip(ip, now) end
return ok({released = released}, now)
