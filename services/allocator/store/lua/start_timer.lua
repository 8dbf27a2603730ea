-- (Re)starts the expiration timer of an allocated address. ARGV[3] ip, [4] timeout ms, [5] new uuid.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local ip, timeout_ms, uuid = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local f = family_of(ip)
local v = redis.call('HGET', K_ALLOC[f], ip)
if not v then return fail('IP_NOT_ALLOCATED') end
local owner, _, idem = unpack_alloc(v)
redis.call('HSET', K_ALLOC[f], ip, owner .. '\t' .. uuid .. '\t' .. idem)
redis.call('ZADD', K_EXP, now + timeout_ms, ip)
return ok({uuid = uuid}, now)
