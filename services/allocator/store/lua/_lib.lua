-- Shared prelude of the pool scripts. The store loads them as one Redis Functions library: this
-- code runs once, when Redis loads the library, and each script's body becomes a function that
-- starts with `bind` (at the end of this file). Code here at the top level may not call Lua's
-- globals (Redis allows only `redis.register_function` while loading).
-- Every pool script gets the same KEYS (all one node's hash tag, so one cluster slot):
local K_NODE, K_POOLS, K_IFACES                  -- [1] [2] [3]
local K_FREE = {}                                -- [4] [5] by family: zset ip -> ms it became free (0 = new)
local K_ADDRS = {}                               -- [6] [7] hash ip -> interface id (attached addresses)
local K_ALLOC = {}                               -- [8] [9] hash ip -> "owner\tuuid\tidempotency key"
local K_OWNERS, K_IDEM, K_EXCLUDED               -- [10] [11] [12]
local K_RESERVED = {}                            -- [13] [14] hash ip -> reservation id
local K_RESERVATIONS, K_EXP, K_PENDING           -- [15] hash id -> reservation, [16], [17]
local K_IFINFO   -- [18] hash interface id -> "mac\tdevice\tgateway\tsubnet\tgateway6\tsubnet6"
local K_WAITING  -- [19] zset "<family>:<call id>" -> deadline ms (wait_for_refill)
local K_LOST     -- [20] hash ip -> ms: allocated, but gone from the cloud
local K_PREFIXES -- [21] hash "a.b.c.d/28" -> interface id: IPv4 prefixes
local K_PFREE    -- [22] zset prefix -> how many of its addresses are free
local K_PREFIX6  -- [23] hash: the pool's IPv6 /80 (see prefix6 below)
-- and the same leading ARGV: pool name, reuse cooldown in ms.
local POOL, COOLDOWN_MS

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function family_of(ip)
  if string.find(ip, ':', 1, true) then return '6' end
  return '4'
end

-- IPv4 /28 prefixes. A prefix's 16 addresses are not kept one by one in K_ADDRS (that would cost
-- as much memory as the free set): an address is attached through its prefix when its /28 is in
-- K_PREFIXES. K_PFREE counts each prefix's addresses in the free set (cooling ones included), so
-- AllocateNext can take from the prefix with the fewest and whole prefixes empty out.
local PREFIX_SIZE = 16
local prefixes_held  -- whether the pool holds any prefix, read once per script (nil = not read yet)

local function has_prefixes()
  if prefixes_held == nil then prefixes_held = redis.call('EXISTS', K_PREFIXES) == 1 end
  return prefixes_held
end

-- The /28 holding an IPv4 address, as "a.b.c.d/28" (nil for an IPv6 address).
local function slash28(ip)
  local head, last = string.match(ip, '^(%d+%.%d+%.%d+%.)(%d+)$')
  if not head then return nil end
  return head .. (tonumber(last) - tonumber(last) % PREFIX_SIZE) .. '/28'
end

-- The 16 addresses of a prefix, lowest first.
local function prefix_ips(p)
  local head, base = string.match(p, '^(%d+%.%d+%.%d+%.)(%d+)/28$')
  local ips = {}
  for i = 0, PREFIX_SIZE - 1 do ips[i + 1] = head .. (tonumber(base) + i) end
  return ips
end

-- The pool's prefix holding an address, and that prefix's interface (nil when none holds it).
local function prefix_of(ip)
  if not has_prefixes() then return nil end
  local p = slash28(ip)
  if not p then return nil end
  local iface = redis.call('HGET', K_PREFIXES, p)
  if iface then return p, iface end
  return nil
end

-- An IPv6 /80. Its 2^48 addresses are never written out: K_PREFIX6 holds the prefix ('cidr', and
-- 'head', its first five groups), its 'iface', a cursor ('next': the next offset never handed out,
-- from 1) and 'held': how many of its addresses the pool has handed out so far (allocated, free
-- again or excluded). A released address goes to the free set like any other and is handed out
-- again before the cursor moves on, so Redis grows with the addresses in use, not with the prefix.
local prefix6_read  -- the prefix as {groups, iface}, false when the pool has none (nil = not read yet)

-- The eight groups of an IPv6 address in text, as numbers (nil when it is not one).
local function ipv6_groups(ip)
  local left, right = ip, ''
  local gap = string.find(ip, '::', 1, true)
  if gap then left, right = string.sub(ip, 1, gap - 1), string.sub(ip, gap + 2) end
  local l, r = {}, {}
  for g in string.gmatch(left, '[^:]+') do l[#l + 1] = tonumber(g, 16) end
  for g in string.gmatch(right, '[^:]+') do r[#r + 1] = tonumber(g, 16) end
  if (gap and #l + #r > 7) or (not gap and #l ~= 8) then return nil end
  local out = {}
  for _, v in ipairs(l) do out[#out + 1] = v end
  for _ = 1, 8 - #l - #r do out[#out + 1] = 0 end
  for _, v in ipairs(r) do out[#out + 1] = v end
  for i = 1, 8 do if not out[i] then return nil end end
  return out
end

-- An IPv6 address in text as Python's ipaddress (RFC 5952) writes it: lowercase, no leading zeros,
-- the first longest run of two or more zero groups as "::".
local function ipv6_text(g)
  local best_start, best_len, start, len = 0, 0, 0, 0
  for i = 1, 8 do
    if g[i] == 0 then
      if len == 0 then start = i end
      len = len + 1
      if len > best_len then best_start, best_len = start, len end
    else
      len = 0
    end
  end
  local parts = {}
  for i = 1, 8 do parts[i] = string.format('%x', g[i]) end
  if best_len < 2 then return table.concat(parts, ':') end
  return table.concat(parts, ':', 1, best_start - 1) .. '::' .. table.concat(parts, ':', best_start + best_len, 8)
end

local function prefix6()
  if prefix6_read == nil then
    local v = redis.call('HMGET', K_PREFIX6, 'head', 'iface')
    prefix6_read = false
    if v[1] then prefix6_read = {groups = ipv6_groups(v[1] .. '::'), iface = v[2]} end
  end
  return prefix6_read
end

-- The interface of the pool's /80 when it holds `ip` (nil otherwise).
local function prefix6_of(ip)
  local p = prefix6()
  if not p then return nil end
  local g = ipv6_groups(ip)
  if not g then return nil end
  for i = 1, 5 do if g[i] ~= p.groups[i] then return nil end end
  return p.iface
end

-- The /80's address at `offset` (below 2^48).
local function prefix6_address(offset)
  local g = {}
  for i = 1, 5 do g[i] = prefix6().groups[i] end
  g[6] = math.floor(offset / 4294967296) % 65536
  g[7] = math.floor(offset / 65536) % 65536
  g[8] = offset % 65536
  return ipv6_text(g)
end

-- The cursor's next address and offset (nil without a /80): skips those taken meanwhile by name
-- (Allocate), free again or excluded. Nothing is written until `prefix6_advance`.
local function prefix6_next()
  if not prefix6() then return nil end
  local offset = tonumber(redis.call('HGET', K_PREFIX6, 'next')) or 1
  while offset < 281474976710656 do
    local ip = prefix6_address(offset)
    if redis.call('HEXISTS', K_ALLOC['6'], ip) == 0 and not redis.call('ZSCORE', K_FREE['6'], ip)
       and redis.call('HEXISTS', K_EXCLUDED, ip) == 0 then
      return ip, offset
    end
    offset = offset + 1
  end
  return nil
end

-- Moves the cursor past `offset`, whose address is now handed out.
local function prefix6_advance(offset)
  redis.call('HSET', K_PREFIX6, 'next', string.format('%.0f', offset + 1))
  redis.call('HINCRBY', K_PREFIX6, 'held', 1)
end

-- The interface an attached address is on, by itself or through its prefix (nil: not attached).
local function iface_of(ip, f)
  local iface = redis.call('HGET', K_ADDRS[f], ip)
  if iface then return iface end
  if f == '6' then return prefix6_of(ip) end
  local _, held_by = prefix_of(ip)
  return held_by
end

local function attached(ip, f)
  return iface_of(ip, f) and true or false
end

-- Puts an address in the free set (score: the ms it became free, 0 = new), counted for its prefix.
local function free_add(f, score, ip)
  if redis.call('ZADD', K_FREE[f], score, ip) == 1 and f == '4' then
    local p = prefix_of(ip)
    if p then redis.call('ZINCRBY', K_PFREE, 1, p) end
  end
end

-- Takes an address out of the free set, uncounted for its prefix.
local function free_remove(f, ip)
  if redis.call('ZREM', K_FREE[f], ip) == 1 and f == '4' then
    local p = prefix_of(ip)
    if p then redis.call('ZINCRBY', K_PFREE, -1, p) end
  end
end

-- Takes a free IPv4 address out of its reuse cooldown from the prefix with the fewest free addresses
-- that has one (within a prefix the one free longest, then the lowest); returns it, its score and its
-- prefix, or nil when no prefix has one. `clock` gives the time, read only when needed.
local function take_from_prefixes(clock)
  if prefixes_held == false then return nil end
  local candidates = redis.call('ZRANGEBYSCORE', K_PFREE, 1, '+inf')
  if #candidates == 0 then return nil end
  prefixes_held = true
  local cutoff = math.huge
  if COOLDOWN_MS > 0 then cutoff = clock() - COOLDOWN_MS end
  for _, p in ipairs(candidates) do
    local ips = prefix_ips(p)
    local scores = redis.call('ZMSCORE', K_FREE['4'], unpack(ips))
    local best, best_score
    for i = 1, PREFIX_SIZE do
      local s = scores[i] and tonumber(scores[i])
      if s and s <= cutoff and (not best or s < best_score) then best, best_score = ips[i], s end
    end
    if best then
      redis.call('ZREM', K_FREE['4'], best)
      redis.call('ZINCRBY', K_PFREE, -1, p)
      return best, best_score, p
    end
  end
  return nil
end

-- The pool's prefixes as counted in the pool state: how many, and the free addresses of those
-- holding an address not free (Cilium counts such a prefix as wholly used when sizing excess: only a
-- prefix with no address in use can be given back).
local function prefix_counts()
  if not has_prefixes() then return 0, 0 end
  local stranded = 0
  local busy = redis.call('ZRANGEBYSCORE', K_PFREE, 1, '(' .. PREFIX_SIZE, 'WITHSCORES')
  for i = 2, #busy, 2 do stranded = stranded + tonumber(busy[i]) end
  return redis.call('HLEN', K_PREFIXES), stranded
end

local function words(s)
  local out = {}
  if s then for w in string.gmatch(s, '%S+') do out[#out + 1] = w end end
  return out
end

local function unpack_alloc(v)
  local owner, uuid, idem = string.match(v, '^([^\t]*)\t([^\t]*)\t(.*)$')
  return owner, uuid, idem
end

local function fail(reason, extra)
  local out = extra or {}
  out.err = reason
  return cjson.encode(out)
end

local function missing_node_or_pool()
  if redis.call('EXISTS', K_NODE) == 0 then return 'NODE_NOT_FOUND' end
  if redis.call('SISMEMBER', K_POOLS, POOL) == 0 then return 'POOL_NOT_FOUND' end
  return nil
end

-- The node's settings used by the watermark arithmetic (hash fields of K_NODE), in their order.
local WATERMARK_FIELDS = {'pre_allocate', 'min_allocate', 'max_allocate', 'max_above_watermark', 'release_excess',
                          'ipv6_enabled'}

local function node_setting(name)
  return redis.call('HGET', K_NODE, name)
end

-- WATERMARK_FIELDS' values, in their order, in one read.
local function watermark_settings()
  return redis.call('HMGET', K_NODE, unpack(WATERMARK_FIELDS))
end

-- The node fields the hot scripts (allocate_next, release) read, in one HMGET.
local NODE_FIELDS = {'created_ms', 'vpc_cidrs', 'deficit_reason', 'pre_allocate', 'min_allocate', 'max_allocate',
                     'max_above_watermark', 'release_excess', 'ipv6_enabled',
                     'prefixes'}  -- "1" once a pool of the node has held a prefix

-- The node's fields (nil when the node does not exist): `v6` its ipv6_enabled, `vpc`, `reason` (why
-- the worker could not refill it), `wm` WATERMARK_FIELDS' values in their order.
local function node_fields()
  local v = redis.call('HMGET', K_NODE, unpack(NODE_FIELDS))
  if not v[1] then return nil end
  local wm = {}
  for i = 1, #WATERMARK_FIELDS do wm[i] = v[i + 3] end
  if v[#NODE_FIELDS] ~= '1' then  -- spares the reads of prefixes on most nodes
    prefixes_held, prefix6_read = false, false
  end
  return {v6 = v[9], vpc = v[2] or '', reason = v[3] or '', wm = wm}
end

-- Counts per family for the watermark arithmetic (done by the caller, in the domain core); `node`
-- from node_fields when the script has read it already.
local function pool_state(now, node)
  local cutoff = now - COOLDOWN_MS
  local counts, reserved = {}, 0
  local prefixes, stranded = prefix_counts()
  for _, f in ipairs({'4', '6'}) do
    local held = redis.call('HLEN', K_ADDRS[f])
    if f == '4' then held = held + prefixes * PREFIX_SIZE
    elseif prefix6() then held = held + (tonumber(redis.call('HGET', K_PREFIX6, 'held')) or 0) end
    local reserved_f = redis.call('HLEN', K_RESERVED[f])
    local available = held - reserved_f
    local free = redis.call('ZCARD', K_FREE[f])
    local cooling = 0
    if COOLDOWN_MS > 0 and free > 0 then cooling = redis.call('ZCOUNT', K_FREE[f], '(' .. cutoff, '+inf') end
    counts[f] = {available, available - free, cooling}
    reserved = reserved + reserved_f
  end
  local wm, reason
  if node then wm, reason = node.wm, node.reason
  else wm, reason = watermark_settings(), redis.call('HGET', K_NODE, 'deficit_reason') or '' end
  -- Callers still waiting (deadline not passed), per family; an entry without a family is IPv4's.
  local waiting = {['4'] = 0, ['6'] = 0}
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K_WAITING, '(' .. now, '+inf')) do
    local f = '4'
    if string.sub(member, 1, 2) == '6:' then f = '6' end
    waiting[f] = waiting[f] + 1
  end
  return {counts = counts, wm = wm, pending = redis.call('EXISTS', K_PENDING),
          waiting = waiting['4'], waiting6 = waiting['6'],
          lost = redis.call('HLEN', K_LOST), reserved = reserved,
          excluded = redis.call('HLEN', K_EXCLUDED), reason = reason, prefixes = prefixes, stranded = stranded,
          prefix6 = prefix6() and 1 or 0}
end

-- A pool state as flat values, appended to `out` (see redis_store._flat_state for their order).
local function append_state(out, st)
  for _, f in ipairs({'4', '6'}) do
    for _, n in ipairs(st.counts[f]) do out[#out + 1] = n end
  end
  for i = 1, #WATERMARK_FIELDS do out[#out + 1] = st.wm[i] or '' end
  for _, v in ipairs({st.pending, st.waiting, st.waiting6, st.lost, st.reserved, st.excluded, st.reason,
                      st.prefixes, st.stranded, st.prefix6}) do
    out[#out + 1] = v
  end
  return out
end

-- The pool state a change's caller decides with, or nil when the pool provably needs no event: an
-- event is pending already, or, per family, no caller waits, its free addresses (those cooling left
-- out) keep the headroom that pre_allocate and min_allocate ask for and, when the node releases
-- excess, stay within pre_allocate + max_above_watermark; a family the node does not enable holds
-- no free address. These bound the arithmetic from the safe side with a few counts; the caller
-- still does it (in the domain core) whenever a state comes back. `clock` gives the time.
local function state_if_needed(node, clock)
  local w = node.wm
  local pre, min, maw = tonumber(w[1]) or 8, tonumber(w[2]) or 0, tonumber(w[4]) or 0
  local releases = w[5] == '1'
  local work = redis.call('ZCARD', K_WAITING) > 0  -- entries past their deadline count too: safe
  for _, f in ipairs({'4', '6'}) do
    if work then break end
    local free = redis.call('ZCARD', K_FREE[f])
    if f == '6' and node.v6 ~= '1' then
      work = free > 0
    elseif f == '6' and prefix6() then
      work = false  -- a /80 never needs a refill, and its addresses go back to the cloud only with it
    else
      local cooling = 0
      if COOLDOWN_MS > 0 and free > 0 then
        cooling = redis.call('ZCOUNT', K_FREE[f], '(' .. (clock() - COOLDOWN_MS), '+inf')
      end
      local headroom = free - cooling
      work = headroom < math.max(pre, min) or (releases and headroom > pre + maw)
    end
  end
  if not work or redis.call('EXISTS', K_PENDING) == 1 then return nil end
  return pool_state(clock(), node)
end

-- The call's clock: Redis's time in ms, read on first use only (`bind` forgets it).
local clock_now
local function clock()
  if not clock_now then clock_now = now_ms() end
  return clock_now
end

local function ok(result, now)
  result.state = pool_state(now)
  return cjson.encode(result)
end

local function owners_add(owner, ip)
  if redis.call('HSETNX', K_OWNERS, owner, ip) == 0 then
    redis.call('HSET', K_OWNERS, owner, redis.call('HGET', K_OWNERS, owner) .. ' ' .. ip)
  end
end

local function owners_remove(owner, ip)
  local kept = {}
  for _, w in ipairs(words(redis.call('HGET', K_OWNERS, owner))) do
    if w ~= ip then kept[#kept + 1] = w end
  end
  if #kept == 0 then redis.call('HDEL', K_OWNERS, owner)
  else redis.call('HSET', K_OWNERS, owner, table.concat(kept, ' ')) end
end

-- Releases one allocated address; it goes back to the free set (cooling from now) unless excluded.
-- `owner_done`: the caller drops the owner's whole entry itself (a release by owner).
local function release_ip(ip, now, owner_done)
  local f = family_of(ip)
  local v = redis.call('HGET', K_ALLOC[f], ip)
  if not v then return false end
  local owner, uuid, idem = unpack_alloc(v)
  redis.call('HDEL', K_ALLOC[f], ip)
  if not owner_done then owners_remove(owner, ip) end
  if idem ~= '' then redis.call('HDEL', K_IDEM, idem) end
  if uuid ~= '' then redis.call('ZREM', K_EXP, ip) end  -- a timer runs only while the allocation holds its uuid
  local single = redis.call('HEXISTS', K_ADDRS[f], ip) == 1
  local prefix = not single and f == '4' and prefix_of(ip)
  if not single and not prefix and not (f == '6' and prefix6_of(ip)) then
    redis.call('HDEL', K_LOST, ip)  -- not attached, maybe lost: it never returns to the free set
  elseif redis.call('HEXISTS', K_EXCLUDED, ip) == 0 then
    if redis.call('ZADD', K_FREE[f], now, ip) == 1 and prefix then redis.call('ZINCRBY', K_PFREE, 1, prefix) end
  end
  return true
end

-- Puts an attached address back in the free set (first in line), unless it is excluded.
local function restore_free(ip, f)
  if not attached(ip, f) or redis.call('HEXISTS', K_EXCLUDED, ip) == 1 then return false end
  free_add(f, 0, ip)
  return true
end

-- A call given up while Redis did not answer leaves this mark under its key (`cancel_call`), so that
-- its script, if it runs later, takes nothing.
local CANCELLED = '-'

-- True (and the mark dropped: a call's script runs once) when the call under this key was given up.
local function cancelled(idem)
  if redis.call('HGET', K_IDEM, idem) ~= CANCELLED then return false end
  redis.call('HDEL', K_IDEM, idem)
  return true
end

-- The allocations held under an idempotency key ({ip, f, owner, uuid} each); nil when the key is
-- free: unknown, or its addresses are gone (then the stale entry is dropped). `prior`: the key's
-- entry when the caller read it already.
local function keyed(idem, prior)
  if prior == nil then prior = redis.call('HGET', K_IDEM, idem) end
  if not prior then return nil end
  local held = {}
  for _, ip in ipairs(words(prior)) do
    local f = family_of(ip)
    local v = redis.call('HGET', K_ALLOC[f], ip)
    if v then
      local o, u, k = unpack_alloc(v)
      if k == idem then held[#held + 1] = {ip = ip, f = f, owner = o, uuid = u} end
    end
  end
  if #held == 0 then
    redis.call('HDEL', K_IDEM, idem)
    return nil
  end
  return held
end

-- What an allocation result needs of the interface holding an address: its id and its compact row
-- (a few bytes, not its table row), '' each when none holds it. `prefix`: the /28 holding it, when known.
local function holder_of(ip, f, prefix)
  local iface
  if prefix then iface = redis.call('HGET', K_PREFIXES, prefix) else iface = iface_of(ip, f) end
  if not iface then return '', '' end
  return iface, redis.call('HGET', K_IFINFO, iface) or ''
end

-- An allocation as the JSON answers give it.
local function describe(ip, f, owner, uuid)
  local iface, info = holder_of(ip, f)
  return {ip = ip, family = f, owner = owner, uuid = uuid, iface = iface, info = info}
end

-- An allocation as the flat answers give it, appended to `out`: ip, family, owner, uuid, interface id
-- and row.
local function append_allocation(out, ip, f, owner, uuid, prefix)
  local iface, info = holder_of(ip, f, prefix)
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] = ip, f, owner, uuid, iface, info
end

-- Fencing. A worker taking a node's lock is issued a token above every earlier one (K_NODE's field
-- 'fence', raised by the worker's fencing_token.lua). A change carrying a token below it comes from
-- a worker whose lock has passed to another (lost in a failover, or expired while it stalled): it is
-- refused before anything is written. A higher token is recorded (its issue was lost with a failed
-- master). 0 = a worker that sends none (a release before fencing): accepted, as before.
local function stale_token(token)
  token = tonumber(token) or 0
  if token <= 0 then return false end
  local newest = tonumber(redis.call('HGET', K_NODE, 'fence') or '0') or 0
  if token < newest then return true end
  if token > newest then redis.call('HSET', K_NODE, 'fence', string.format('%.0f', token)) end
  return false
end

-- Sets the keys and the leading arguments of one call; what a script caches starts out unread.
local function bind(keys, args)
  K_NODE, K_POOLS, K_IFACES = keys[1], keys[2], keys[3]
  K_FREE['4'], K_FREE['6'], K_ADDRS['4'], K_ADDRS['6'] = keys[4], keys[5], keys[6], keys[7]
  K_ALLOC['4'], K_ALLOC['6'], K_OWNERS, K_IDEM, K_EXCLUDED = keys[8], keys[9], keys[10], keys[11], keys[12]
  K_RESERVED['4'], K_RESERVED['6'], K_RESERVATIONS, K_EXP, K_PENDING = keys[13], keys[14], keys[15], keys[16], keys[17]
  K_IFINFO, K_WAITING, K_LOST, K_PREFIXES, K_PFREE, K_PREFIX6 = keys[18], keys[19], keys[20], keys[21], keys[22], keys[23]
  POOL, COOLDOWN_MS = args[1], tonumber(args[2])
  prefixes_held, prefix6_read, clock_now = nil, nil, nil
end
