-- Creates or updates a node. ARGV[3] "create"/"update", [4] spec (protobuf bytes),
-- [5] pre_allocate, [6] min_allocate, [7] max_allocate, [8] max_above_watermark,
-- [9] release excess (0/1), [10] IPv6 enabled (0/1), [11] first interface index.
local exists = redis.call('EXISTS', K_NODE) == 1
if ARGV[3] == 'create' and exists then return fail('NODE_ALREADY_EXISTS') end
if ARGV[3] == 'update' and not exists then return fail('NODE_NOT_FOUND') end
local now = now_ms()
redis.call('HSET', K_NODE, 'spec', ARGV[4], 'pre', ARGV[5], 'min', ARGV[6], 'max', ARGV[7],
           'maw', ARGV[8], 'rel', ARGV[9], 'v6', ARGV[10], 'fii', ARGV[11])
if not exists then redis.call('HSET', K_NODE, 'created_ms', now) end
redis.call('SADD', K_POOLS, POOL)
return ok({}, now)
