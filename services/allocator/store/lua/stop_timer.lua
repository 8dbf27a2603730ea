-- Stops a running timer; the uuid must be the running one. ARGV[3] ip, [4] uuid.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local ip, uuid = ARGV[3], ARGV[4]
local f = family_of(ip)
local v = redis.call('HGET', K_ALLOC[f], ip)
if not v then return fail('IP_NOT_ALLOCATED') end
local owner, current, idem = unpack_alloc(v)
if current == '' then return fail('NO_TIMER_RUNNING') end
if current ~= uuid then return fail('EXPIRATION_UUID_MISMATCH') end
redis.call('HSET', K_ALLOC[f], ip, owner .. '\t\t' .. idem)
redis.call('ZREM', K_EXP, ip)
return ok({}, now)
