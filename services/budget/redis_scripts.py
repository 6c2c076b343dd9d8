"""Lua scripts of the Redis budget store: one script per operation, run with EVALSHA (reloaded on NOSCRIPT).

Every key a script touches is declared in KEYS. A *domain* is the set of keys in one hash slot: a tenant's keys
(``{t:<tenant>}:...``) or the global scope's keys (``{g}:...``). Per domain:

``pol``  hash  scope key -> policy JSON (see :meth:`services.budget.model.Policy.to_json`; -1 = unset)
``st``   hash  ``<scope>\\x1frc|rt`` reserved cost/tokens; ``<scope>\\x1f<h|d|m>`` current bucket and
               ``<scope>\\x1f<h|d|m><c|t>`` spent in it; ``<scope>\\x1fl<c|t>`` lifetime spent
``rl:<scope>`` hash  rate ring: second % 60 -> ``sec\\x1fcount\\x1ftokens``
``exp``  zset  active reservation id -> expiry (ms); everything at or below "now" is returned on entry
``res``  hash  reservation id -> record, fields joined by \\x1f: state (a|c|r|e), cost, tokens, expires, scopes
               (joined by \\x1e), request_id, team, feature, end_user, model, tier, actual, over
``gc``   zset  reservation id -> when its record is dropped (expiry + retention)

A tenant domain also has ``req`` (request id -> reservation id), usage rollups ``u:<m|h|d>:<bucket>`` and ``u:L``
(field ``<dims>\\x1e<counter>``), ``meta`` (first activity) and ``sav``/``savgc`` (savings idempotency). A global
record is keyed ``<tenant>\\x1f<reservation id>``.

Numbers: values are integers below 2**53 (validated), so Lua's doubles hold them exactly; numbers passed back to
redis.call are formatted with %.17g by Redis, and replies convert them to integers — no tostring() of big numbers.
"""

from __future__ import annotations

_COMMON = r"""
local S = '\31'
local function split(s, sep)
  local out, i = {}, 1
  while true do
    local j = string.find(s, sep, i, true)
    if not j then out[#out + 1] = string.sub(s, i); return out end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end
local function unreserve(st, r)
  if r[5] == '' then return end
  local c, t = 0 - tonumber(r[2]), 0 - tonumber(r[3])  -- never -0: HINCRBY rejects '-0'
  for _, sk in ipairs(split(r[5], '\30')) do
    redis.call('HINCRBY', st, sk .. S .. 'rc', c)
    redis.call('HINCRBY', st, sk .. S .. 'rt', t)
  end
end
-- return the money of every reservation whose expiry is <= now
local function purge(exp, res, st, now)
  local ids = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
  if #ids == 0 then return end
  for i = 1, #ids do
    local raw = redis.call('HGET', res, ids[i])
    if raw then
      local r = split(raw, S)
      if r[1] == 'a' then
        unreserve(st, r)
        r[1] = 'e'
        redis.call('HSET', res, ids[i], table.concat(r, S))
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', exp, '-inf', now)
end
-- drop records past their retention (bounded work per call)
local function gc(gck, res, req, now)
  local ids = redis.call('ZRANGEBYSCORE', gck, '-inf', now, 'LIMIT', 0, 32)
  for i = 1, #ids do
    if req then
      local raw = redis.call('HGET', res, ids[i])
      if raw then
        local rid = split(raw, S)[6]
        if redis.call('HGET', req, rid) == ids[i] then redis.call('HDEL', req, rid) end
      end
    end
    redis.call('HDEL', res, ids[i])
    redis.call('ZREM', gck, ids[i])
  end
end
local function nz(v) if v then return tonumber(v) end return 0 end
local function bk(v) if v then return tonumber(v) end return -1 end
-- the counters of one scope with a policy (nil without one); rl = rate ring key or false
local function read_scope(pol, st, rl, sk, hb, db, mb, now_s)
  local pj = redis.call('HGET', pol, sk)
  if not pj then return nil end
  local f = redis.call('HMGET', st, sk .. S .. 'rc', sk .. S .. 'rt',
    sk .. S .. 'h', sk .. S .. 'hc', sk .. S .. 'ht', sk .. S .. 'd', sk .. S .. 'dc', sk .. S .. 'dt',
    sk .. S .. 'm', sk .. S .. 'mc', sk .. S .. 'mt', sk .. S .. 'lc', sk .. S .. 'lt')
  local s = {sk = sk, pj = pj, p = cjson.decode(pj), st = st, rl = rl, rc = nz(f[1]), rt = nz(f[2]),
             hc = 0, ht = 0, dc = 0, dt = 0, mc = 0, mt = 0, lc = nz(f[12]), lt = nz(f[13]), rn = 0, rk = 0, ro = 0}
  if bk(f[3]) >= hb then s.hc, s.ht = nz(f[4]), nz(f[5]) end
  if bk(f[6]) >= db then s.dc, s.dt = nz(f[7]), nz(f[8]) end
  if bk(f[9]) >= mb then s.mc, s.mt = nz(f[10]), nz(f[11]) end
  if rl and (s.p.r > 0 or s.p.k > 0) then
    local ring = redis.call('HGETALL', rl)
    for i = 1, #ring, 2 do
      local v = split(ring[i + 1], S)
      local sec = tonumber(v[1])
      if sec > now_s - 60 then
        s.rn = s.rn + tonumber(v[2])
        s.rk = s.rk + tonumber(v[3])
        if s.ro == 0 or sec < s.ro then s.ro = sec end
      end
    end
  end
  return s
end
local function spent(s, w)
  if w == 1 then return s.hc, s.ht elseif w == 2 then return s.dc, s.dt elseif w == 3 then return s.mc, s.mt end
  return s.lc, s.lt
end
-- the same comparisons as services.budget.policy.violations
local function admits(s, ec, et)
  for _, l in ipairs(s.p.l) do
    local c, t = spent(s, l[1])
    if l[2] >= 0 and c + s.rc + ec > l[2] then return false end
    if l[3] >= 0 and t + s.rt + et > l[3] then return false end
  end
  if s.p.r > 0 and s.rn + 1 > s.p.r then return false end
  if s.p.k > 0 and s.rk + et > s.p.k then return false end
  return true
end
local function block(out, s)
  local n = #out
  out[n + 1] = s.sk; out[n + 2] = s.pj; out[n + 3] = s.rc; out[n + 4] = s.rt
  out[n + 5] = s.hc; out[n + 6] = s.ht; out[n + 7] = s.dc; out[n + 8] = s.dt; out[n + 9] = s.mc; out[n + 10] = s.mt
  out[n + 11] = s.lc; out[n + 12] = s.lt; out[n + 13] = s.rn; out[n + 14] = s.rk; out[n + 15] = s.ro
end
local function charge_window(st, sk, w, bucket, c, t)
  local f = sk .. S .. w
  local cur = redis.call('HGET', st, f)
  if cur and tonumber(cur) >= bucket then
    redis.call('HINCRBY', st, f .. 'c', c)
    redis.call('HINCRBY', st, f .. 't', t)
  else
    redis.call('HSET', st, f, bucket, f .. 'c', c, f .. 't', t)
  end
end
local function charge(st, sk, c, t, hb, db, mb)
  charge_window(st, sk, 'h', hb, c, t)
  charge_window(st, sk, 'd', db, c, t)
  charge_window(st, sk, 'm', mb, c, t)
  redis.call('HINCRBY', st, sk .. S .. 'lc', c)
  redis.call('HINCRBY', st, sk .. S .. 'lt', t)
end
-- settle the global part of a reservation: return its reservation, charge the global scope (once)
local function settle_global(g, gid, actual, tokens, hb, db, mb, gc_at, mark)
  local raw = redis.call('HGET', g.res, gid)
  local r
  if raw then r = split(raw, S) else r = {'e', '0', '0', '0', '', '', '', '', '', '', '0', '0', '0'} end
  if r[1] == 'c' then return end
  if r[1] == 'a' then
    unreserve(g.st, r)
    redis.call('ZREM', g.exp, gid)
  end
  if redis.call('HEXISTS', g.pol, 'g') == 1 then charge(g.st, 'g', actual, tokens, hb, db, mb) end
  if raw or mark then
    r[1] = 'c'
    r[12] = string.format('%d', actual)
    redis.call('HSET', g.res, gid, table.concat(r, S))
    if not raw then redis.call('ZADD', g.gc, gc_at, gid) end
  end
end
local function release_global(g, gid)
  local raw = redis.call('HGET', g.res, gid)
  if not raw then return end
  local r = split(raw, S)
  if r[1] ~= 'a' then return end
  unreserve(g.st, r)
  redis.call('ZREM', g.exp, gid)
  r[1] = 'r'
  redis.call('HSET', g.res, gid, table.concat(r, S))
end
local function add_usage(keys, dims, codes, values, now, minute_ttl, hour_ttl)
  for k = 1, 4 do
    for i = 1, #codes do
      if values[i] ~= 0 then redis.call('HINCRBY', keys[k], dims .. '\30' .. codes[i], values[i]) end
    end
  end
  redis.call('PEXPIRE', keys[1], minute_ttl)
  redis.call('PEXPIRE', keys[2], hour_ttl)
end
"""

# KEYS: req, then per domain: pol st exp res gc, then one rate-ring key per scope (domains in order).
# ARGV: now expires est_cost est_tokens res_id request_id team feature end_user model tier hb db mb gc_at idem
#       ndomains, then per domain: record id, nscopes, scope keys...
# Reply: {status, reservation id, expires, blocks...}; status 1 admitted, 0 rejected, 2 replayed.
RESERVE = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local now_s = math.floor(now / 1000)
local ec, et = tonumber(ARGV[3]), tonumber(ARGV[4])
local hb, db, mb = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local idem = ARGV[16] == '1'
local nd = tonumber(ARGV[17])
local doms, a, rk = {}, 18, 2 + 5 * nd
for d = 1, nd do
  local b = 1 + (d - 1) * 5
  local dom = {pol = KEYS[b + 1], st = KEYS[b + 2], exp = KEYS[b + 3], res = KEYS[b + 4], gc = KEYS[b + 5],
               id = ARGV[a], scopes = {}, snaps = {}}
  local ns = tonumber(ARGV[a + 1])
  a = a + 2
  for i = 1, ns do
    dom.scopes[i] = {ARGV[a], KEYS[rk]}
    a = a + 1
    rk = rk + 1
  end
  doms[d] = dom
end
local out = {0, '', 0}
local all = {}
for d = 1, nd do
  local dom = doms[d]
  purge(dom.exp, dom.res, dom.st, now)
  gc(dom.gc, dom.res, (d == 1 and idem) and KEYS[1] or nil, now)
  for i = 1, #dom.scopes do
    local s = read_scope(dom.pol, dom.st, dom.scopes[i][2], dom.scopes[i][1], hb, db, mb, now_s)
    if s then
      dom.snaps[#dom.snaps + 1] = s
      all[#all + 1] = s
    end
  end
end
if idem then
  local rid = redis.call('HGET', KEYS[1], ARGV[6])
  if rid then
    local raw = redis.call('HGET', doms[1].res, rid)
    out[1], out[2] = 2, rid
    if raw then out[3] = tonumber(split(raw, S)[4]) end
    for i = 1, #all do block(out, all[i]) end
    return out
  end
end
for i = 1, #all do
  if not admits(all[i], ec, et) then
    for j = 1, #all do block(out, all[j]) end
    return out
  end
end
local slot = tostring(now_s % 60)
for i = 1, #all do
  local s = all[i]
  redis.call('HINCRBY', s.st, s.sk .. S .. 'rc', ec)
  redis.call('HINCRBY', s.st, s.sk .. S .. 'rt', et)
  s.rc, s.rt = s.rc + ec, s.rt + et
  if s.p.r > 0 or s.p.k > 0 then
    local n, k = 1, et
    local v = redis.call('HGET', s.rl, slot)
    if v then
      local p = split(v, S)
      if tonumber(p[1]) == now_s then n, k = tonumber(p[2]) + 1, tonumber(p[3]) + et end
    end
    redis.call('HSET', s.rl, slot, string.format('%d\31%d\31%d', now_s, n, k))
    redis.call('PEXPIRE', s.rl, 61000)
    s.rn, s.rk = s.rn + 1, s.rk + et
    if s.ro == 0 then s.ro = now_s end
  end
end
for d = 1, nd do
  local dom = doms[d]
  if (d == 1 and idem) or #dom.snaps > 0 then
    local sks = {}
    for i = 1, #dom.snaps do sks[i] = dom.snaps[i].sk end
    local rec = {'a', ARGV[3], ARGV[4], ARGV[2], table.concat(sks, '\30'), ARGV[6], ARGV[7], ARGV[8], ARGV[9],
                 ARGV[10], ARGV[11], '0', '0'}
    redis.call('HSET', dom.res, dom.id, table.concat(rec, S))
    redis.call('ZADD', dom.exp, ARGV[2], dom.id)
    redis.call('ZADD', dom.gc, ARGV[15], dom.id)
  end
end
if idem then redis.call('HSET', KEYS[1], ARGV[6], ARGV[5]) end
out[1], out[2], out[3] = 1, ARGV[5], tonumber(ARGV[2])
for i = 1, #all do block(out, all[i]) end
return out
"""
)

# KEYS: pol st exp res gc u:m u:h u:d u:L meta [gpol gst gexp gres ggc]
# ARGV: now res_id actual in out cached model tier saved hb db mb minute_ttl hour_ttl with_global tenant gc_at
# Reply: {status, charged, over, late, tokens, blocks...}; status 1 committed, 2 replayed, -1 not found, -2 released.
COMMIT = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local hb, db, mb = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local with_g = ARGV[15] == '1'
local g = nil
if with_g then g = {pol = KEYS[11], st = KEYS[12], exp = KEYS[13], res = KEYS[14], gc = KEYS[15]} end
purge(KEYS[3], KEYS[4], KEYS[2], now)
if g then purge(g.exp, g.res, g.st, now) end
local raw = redis.call('HGET', KEYS[4], ARGV[2])
if not raw then return {-1} end
local r = split(raw, S)
local actual = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4]) + tonumber(ARGV[5])
local sks = {'t'}
if r[7] ~= '' then sks[#sks + 1] = 'T:' .. r[7] end
if r[8] ~= '' then sks[#sks + 1] = 'F:' .. r[8] end
if r[9] ~= '' then sks[#sks + 1] = 'U:' .. r[9] end
local out = {1, actual, 0, 0, tokens}
local function blocks()
  for i = 1, #sks do
    local s = read_scope(KEYS[1], KEYS[2], false, sks[i], hb, db, mb, 0)
    if s then block(out, s) end
  end
  if g then
    local s = read_scope(g.pol, g.st, false, 'g', hb, db, mb, 0)
    if s then block(out, s) end
  end
  return out
end
if r[1] == 'c' then
  out[1], out[2], out[3] = 2, tonumber(r[12]), tonumber(r[13])
  return blocks()
end
if r[1] == 'r' then return {-2} end
if r[1] == 'e' then out[4] = 1 end
if r[1] == 'a' then
  unreserve(KEYS[2], r)
  redis.call('ZREM', KEYS[3], ARGV[2])
end
local over = 0
if actual > tonumber(r[2]) then over = 1 end
out[3] = over
for i = 1, #sks do
  if redis.call('HEXISTS', KEYS[1], sks[i]) == 1 then charge(KEYS[2], sks[i], actual, tokens, hb, db, mb) end
end
local model, tier = ARGV[7], ARGV[8]
if model == '' then model = r[10] end
if tier == '0' then tier = r[11] end
local dims = r[7] .. S .. r[8] .. S .. model .. S .. tier .. S .. r[9]
add_usage({KEYS[6], KEYS[7], KEYS[8], KEYS[9]}, dims, {'c', 'i', 'o', 'k', 'n', 's', 'x'},
  {actual, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), 1, tonumber(ARGV[9]), over},
  now, tonumber(ARGV[13]), tonumber(ARGV[14]))
redis.call('HSETNX', KEYS[10], 'first', ARGV[1])
r[1], r[12], r[13] = 'c', ARGV[3], tostring(over)
redis.call('HSET', KEYS[4], ARGV[2], table.concat(r, S))
if g then settle_global(g, ARGV[16] .. S .. ARGV[2], actual, tokens, hb, db, mb, tonumber(ARGV[17]), false) end
return blocks()
"""
)

# KEYS: st exp res [gst gexp gres]   ARGV: now res_id with_global tenant
# Reply: {status, released, state}; status 1 released, 2 replayed (state says why), -1 not found.
RELEASE = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local g = nil
if ARGV[3] == '1' then g = {st = KEYS[4], exp = KEYS[5], res = KEYS[6]} end
purge(KEYS[2], KEYS[3], KEYS[1], now)
if g then purge(g.exp, g.res, g.st, now) end
local raw = redis.call('HGET', KEYS[3], ARGV[2])
if not raw then return {-1, 0, ''} end
local r = split(raw, S)
if r[1] ~= 'a' then return {2, 0, r[1]} end
unreserve(KEYS[1], r)
redis.call('ZREM', KEYS[2], ARGV[2])
r[1] = 'r'
redis.call('HSET', KEYS[3], ARGV[2], table.concat(r, S))
if g then release_global(g, ARGV[4] .. S .. ARGV[2]) end
return {1, tonumber(r[2]), 'r'}
"""
)

# Cluster mode, second step of Commit on the global slot. KEYS: gpol gst gexp gres ggc
# ARGV: now gid actual tokens hb db mb gc_at   Reply: the global block after settling ({} without a policy).
GLOBAL_SETTLE = (
    _COMMON
    + r"""
local g = {pol = KEYS[1], st = KEYS[2], exp = KEYS[3], res = KEYS[4], gc = KEYS[5]}
purge(g.exp, g.res, g.st, tonumber(ARGV[1]))
local hb, db, mb = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
settle_global(g, ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), hb, db, mb, tonumber(ARGV[8]), true)
local out = {}
local s = read_scope(g.pol, g.st, false, 'g', hb, db, mb, 0)
if s then block(out, s) end
return out
"""
)

# Cluster mode: second step of Release (KEYS: gst gexp gres; ARGV: now gid), or undo of a global reservation
# whose tenant step did not admit (ARGV[3] == '1': the record is deleted so a retry starts afresh).
GLOBAL_RELEASE = (
    _COMMON
    + r"""
local g = {st = KEYS[1], exp = KEYS[2], res = KEYS[3]}
purge(g.exp, g.res, g.st, tonumber(ARGV[1]))
release_global(g, ARGV[2])
if ARGV[3] == '1' then
  redis.call('HDEL', g.res, ARGV[2])
  redis.call('ZREM', g.exp, ARGV[2])
end
return 1
"""
)

# KEYS: pol st exp res rl   ARGV: now scope_key hb db mb   Reply: block or {} without a policy.
SNAPSHOT = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
purge(KEYS[3], KEYS[4], KEYS[2], now)
local s = read_scope(KEYS[1], KEYS[2], KEYS[5], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  math.floor(now / 1000))
local out = {}
if s then block(out, s) end
return out
"""
)

# KEYS: pol st   ARGV: scope_key json hb hc ht db dc dt mb mc mt lc lt   Reply: 1 when the policy already existed.
PUT_POLICY = r"""
local S = '\31'
local sk = ARGV[1]
local existed = redis.call('HEXISTS', KEYS[1], sk)
redis.call('HSET', KEYS[1], sk, ARGV[2])
if existed == 0 then
  redis.call('HSET', KEYS[2], sk .. S .. 'rc', 0, sk .. S .. 'rt', 0,
    sk .. S .. 'h', ARGV[3], sk .. S .. 'hc', ARGV[4], sk .. S .. 'ht', ARGV[5],
    sk .. S .. 'd', ARGV[6], sk .. S .. 'dc', ARGV[7], sk .. S .. 'dt', ARGV[8],
    sk .. S .. 'm', ARGV[9], sk .. S .. 'mc', ARGV[10], sk .. S .. 'mt', ARGV[11],
    sk .. S .. 'lc', ARGV[12], sk .. S .. 'lt', ARGV[13])
end
return existed
"""

# KEYS: sav savgc u:m u:h u:d u:L meta   ARGV: now request_id dims saved hit gc_at minute_ttl hour_ttl
# Reply: 1 when replayed.
SAVINGS = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 32)
for i = 1, #old do
  redis.call('HDEL', KEYS[1], old[i])
  redis.call('ZREM', KEYS[2], old[i])
end
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[6]) == 0 then return 1 end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
add_usage({KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, ARGV[3], {'s', 'h'}, {tonumber(ARGV[4]), tonumber(ARGV[5])},
  now, tonumber(ARGV[7]), tonumber(ARGV[8]))
redis.call('HSETNX', KEYS[7], 'first', ARGV[1])
return 0
"""
)
