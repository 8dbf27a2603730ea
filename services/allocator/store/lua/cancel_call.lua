-- Gives back what a call took under its key when the call was given up without an answer from
-- Redis; when its script has not run yet, leaves the mark that makes it take nothing when it does.
-- Running this twice is the same as once. ARGV[3] the key.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local key = ARGV[3]
local prior = redis.call('HGET', K_IDEM, key)
local released = {}
if prior == CANCELLED then return ok({released = released}, now) end
if prior then
  for _, ip in ipairs(words(prior)) do
    if release_ip(ip, now) then released[#released + 1] = ip end
  end
  redis.call('HDEL', K_IDEM, key)
else
  redis.call('HSET', K_IDEM, key, CANCELLED)
end
return ok({released = released}, now)
