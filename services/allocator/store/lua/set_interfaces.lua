-- Replaces the node's interface table with what the cloud holds, and keeps its cloud facts.
-- ARGV[3] fencing token, [4] VPC CIDRs (space-separated, "" = keep), [5] max interfaces,
-- [6] IPv4 per interface (0 = keep), [7] deficit reason, then per interface: id, JSON, info.
if redis.call('EXISTS', K_NODE) == 0 then return fail('NODE_NOT_FOUND') end
if stale_token(ARGV[3]) then return fail('STALE_FENCING_TOKEN') end
redis.call('DEL', K_IFACES, K_IFINFO)
for i = 8, #ARGV, 3 do
  redis.call('HSET', K_IFACES, ARGV[i], ARGV[i + 1])
  redis.call('HSET', K_IFINFO, ARGV[i], ARGV[i + 2])
end
redis.call('HSET', K_NODE, 'deficit_reason', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', K_NODE, 'vpc_cidrs', ARGV[4]) end
if tonumber(ARGV[5]) > 0 then redis.call('HSET', K_NODE, 'max_ifaces', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HSET', K_NODE, 'ipv4_per_iface', ARGV[6]) end
return cjson.encode({})
