"""Lua scripts of the Redis budget store: one script per operation, run with EVALSHA (reloaded on NOSCRIPT).

Every key a script names is declared in KEYS. A *domain* is the set of keys in one hash slot: a tenant's keys
(``{t:<tenant>}:...``) or the global scope's keys (``{g}:...``). Per domain:

``st``   hash  ``<scope>\\x1fp`` -> policy JSON (:meth:`services.budget.model.Policy.to_json`; -1 = unset) and
               ``<scope>\\x1fs`` -> the scope's counters as 13 little-endian int64 (``struct`` '<i8'*13): reserved
               cost/tokens, then for hour/day/month the current bucket and the cost/tokens spent in it, then
               lifetime cost/tokens. One HMGET reads a scope, one HSET writes it.
               ``<scope>\\x1fq<n>`` (n = second % 60) -> the rate ring: (second, requests, tokens) as 3 int64
``exp``  zset  active reservation id -> expiry (ms); everything at or below "now" is returned on entry
``res``  hash  reservation id -> record, fields joined by \\x1f: state (a|c|r|e), cost, tokens, expires, scopes
               (joined by \\x1e), request_id, team, feature, end_user, model, tier, actual, over, late (of a
               committed one: "" or the state it was in when the commit came, e or r; absent in records written
               before late commits were flagged)
``gc``   zset  settled reservation id -> when its record is dropped (settlement + retention)

A tenant domain also has ``req`` (request id -> its current reservation id: one released or expired is replaced
by the next admission of the request id), usage rollups ``u:<m|h|d>:<bucket>`` and ``u:L`` (field: dims joined by
\\x1f -> 9 int64 counters c,i,o,k,n,s,h,x,l; 8 in cells written before l existed), ``meta`` (first activity) and
``sav``/``savgc`` (savings idempotency). A global record is keyed ``<tenant>\\x1f<reservation id>``; in standalone
mode the tenant record is the source of truth and the global record only carries the amount until settled.

Numbers: values are integers below 2**53 (validated), so Lua's doubles hold them exactly; counters are packed with
the ``struct`` library (C speed; parsing text in Lua costs ~8 µs per scope) and never go through tostring().
Cost: every redis.call inside a script costs a microsecond or more, so state is packed to keep calls per
operation low (a Reserve over 3 scopes makes ~15 calls, a Commit ~25). Arguments are few too: the numbers of a
call travel as one binary argument (int64s), and scope keys are derived in the script from the attribution.
"""

from __future__ import annotations

import re

_HELPERS = r"""
local S = '\31'
local F13 = '<i8i8i8i8i8i8i8i8i8i8i8i8i8'
local F8 = '<i8i8i8i8i8i8i8i8'
local F9 = '<i8i8i8i8i8i8i8i8i8'
local F3 = '<i8i8i8'
local function split(s, sep)
  local out, i = {}, 1
  while true do
    local j = string.find(s, sep, i, true)
    if not j then out[#out + 1] = string.sub(s, i); return out end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end
-- one scope with a policy (nil without one): {sk, pj, st, x = 13 counters}
local function load(st, sk)
  local v = redis.call('HMGET', st, sk .. S .. 'p', sk .. S .. 's')
  if not v[1] then return nil end
  local x
  if v[2] then x = {struct.unpack(F13, v[2])} else x = {0, 0, -1, 0, 0, -1, 0, 0, -1, 0, 0, 0, 0} end
  return {sk = sk, pj = v[1], st = st, x = x, rn = 0, rk = 0, ro = 0}
end
local function save(s)
  redis.call('HSET', s.st, s.sk .. S .. 's', struct.pack(F13, unpack(s.x, 1, 13)))
end
local function policy(s)
  if not s.p then s.p = cjson.decode(s.pj) end
  return s.p
end
-- subtract a record's reservation from the scopes it holds (loaded: sk -> scope already in hand, or nil)
local function unreserve(st, r, loaded)
  if r[5] == '' then return end
  local c, t = tonumber(r[2]), tonumber(r[3])
  for _, sk in ipairs(split(r[5], '\30')) do
    local s = loaded and loaded[sk]
    if s then
      s.x[1], s.x[2] = s.x[1] - c, s.x[2] - t
    else
      s = load(st, sk)
      if s then
        s.x[1], s.x[2] = s.x[1] - c, s.x[2] - t
        save(s)
      end
    end
  end
end
-- return the money of every reservation whose expiry is <= now; keep = keep the record (else delete it)
local function purge(d, now, keep)
  local ids = redis.call('ZRANGEBYSCORE', d.exp, '-inf', now)
  if #ids == 0 then return end
  for i = 1, #ids do
    local raw = redis.call('HGET', d.res, ids[i])
    if raw then
      local r = split(raw, S)
      if r[1] == 'a' then
        unreserve(d.st, r, nil)
        if keep then
          r[1] = 'e'
          redis.call('HSET', d.res, ids[i], table.concat(r, S))
          redis.call('ZADD', d.gc, tonumber(r[4]) + d.ret, ids[i])
        else
          redis.call('HDEL', d.res, ids[i])
        end
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', d.exp, '-inf', now)
end
-- drop settled records past their retention (bounded work; the caller runs it now and then)
local function gc(d, req, now)
  local ids = redis.call('ZRANGEBYSCORE', d.gc, '-inf', now, 'LIMIT', 0, 64)
  for i = 1, #ids do
    if req then
      local raw = redis.call('HGET', d.res, ids[i])
      if raw then
        local rid = split(raw, S)[6]
        if redis.call('HGET', req, rid) == ids[i] then redis.call('HDEL', req, rid) end
      end
    end
    redis.call('HDEL', d.res, ids[i])
    redis.call('ZREM', d.gc, ids[i])
  end
end
-- requests and tokens admitted in the rolling minute (only for rate-capped policies)
local function rate(s, now_s)
  local p = policy(s)
  if not (p.r > 0 or p.k > 0) then return end
  local fields = {}
  for i = 0, 59 do fields[i + 1] = s.sk .. S .. 'q' .. i end
  local ring = redis.call('HMGET', s.st, unpack(fields))
  for i = 1, 60 do
    if ring[i] then
      local sec, n, k = struct.unpack(F3, ring[i])
      if sec > now_s - 60 then
        s.rn = s.rn + n
        s.rk = s.rk + k
        if s.ro == 0 or sec < s.ro then s.ro = sec end
      end
    end
  end
end
local function count_rate(s, now_s, et)
  local f = s.sk .. S .. 'q' .. (now_s % 60)
  local n, k = 1, et
  local v = redis.call('HGET', s.st, f)
  if v then
    local sec, n0, k0 = struct.unpack(F3, v)
    if sec == now_s then n, k = n0 + 1, k0 + et end
  end
  redis.call('HSET', s.st, f, struct.pack(F3, now_s, n, k))
  s.rn, s.rk = s.rn + 1, s.rk + et
  if s.ro == 0 then s.ro = now_s end
end
local function tenant_scopes(team, feature, end_user)
  local sks = {'t'}
  if team ~= '' then sks[#sks + 1] = 'T:' .. team end
  if feature ~= '' then sks[#sks + 1] = 'F:' .. feature end
  if end_user ~= '' then sks[#sks + 1] = 'U:' .. end_user end
  return sks
end
local function i2s(n) return string.format('%d', n) end
-- (cost, tokens) spent in the current bucket of window w (1 hour, 2 day, 3 month, 4 lifetime)
local function spent(x, w, hb, db, mb)
  if w == 1 then if x[3] >= hb then return x[4], x[5] end return 0, 0 end
  if w == 2 then if x[6] >= db then return x[7], x[8] end return 0, 0 end
  if w == 3 then if x[9] >= mb then return x[10], x[11] end return 0, 0 end
  return x[12], x[13]
end
-- the same comparisons as services.budget.policy.violations
local function admits(s, ec, et, hb, db, mb)
  local p, x = policy(s), s.x
  for _, l in ipairs(p.l) do
    local c, t = spent(x, l[1], hb, db, mb)
    if l[2] >= 0 and c + x[1] + ec > l[2] then return false end
    if l[3] >= 0 and t + x[2] + et > l[3] then return false end
  end
  if p.r > 0 and s.rn + 1 > p.r then return false end
  if p.k > 0 and s.rk + et > p.k then return false end
  return true
end
-- one reply element per scope: 13 int64 (rc rt hc ht dc dt mc mt lc lt rn rk ro) .. "<scope>\31<policy json>"
local function block(out, s, hb, db, mb)
  local x = s.x
  local hc, ht = spent(x, 1, hb, db, mb)
  local dc, dt = spent(x, 2, hb, db, mb)
  local mc, mt = spent(x, 3, hb, db, mb)
  out[#out + 1] = struct.pack(F13, x[1], x[2], hc, ht, dc, dt, mc, mt, x[12], x[13], s.rn, s.rk, s.ro)
    .. s.sk .. S .. s.pj
end
local function charge(s, c, t, hb, db, mb)
  local x = s.x
  if x[3] >= hb then x[4], x[5] = x[4] + c, x[5] + t else x[3], x[4], x[5] = hb, c, t end
  if x[6] >= db then x[7], x[8] = x[7] + c, x[8] + t else x[6], x[7], x[8] = db, c, t end
  if x[9] >= mb then x[10], x[11] = x[10] + c, x[11] + t else x[9], x[10], x[11] = mb, c, t end
  x[12], x[13] = x[12] + c, x[13] + t
end
-- usage cells: 9 int64 counters (c i o k n s h x l); a cell written before late commits were counted has 8
local function add_usage(keys, ttls, dims, v)
  for k = 1, #keys do
    local cur = redis.call('HGET', keys[k], dims)
    local a
    if not cur then
      a = {0, 0, 0, 0, 0, 0, 0, 0, 0}
    elseif #cur == 64 then
      a = {struct.unpack(F8, cur)}
      a[9] = 0
    else
      a = {struct.unpack(F9, cur)}
    end
    for i = 1, 9 do a[i] = a[i] + v[i] end
    redis.call('HSET', keys[k], dims, struct.pack(F9, unpack(a, 1, 9)))
    if not cur and ttls[k] then redis.call('PEXPIRE', keys[k], ttls[k]) end
  end
end
local function domain(keys, b, ret)
  return {st = keys[b], exp = keys[b + 1], res = keys[b + 2], gc = keys[b + 3], ret = ret}
end
-- settle the global part of a reservation: return what it holds, charge the global scope once. keep (cluster
-- mode): records stay, marked settled, so a retried settle is a no-op; else the record is deleted (standalone: the
-- tenant record in the same script already guarantees once)
local function settle_global(g, gid, actual, tokens, hb, db, mb, now, keep)
  local raw = redis.call('HGET', g.res, gid)
  local r = nil
  if raw then r = split(raw, S) end
  if r and r[1] == 'c' then return load(g.st, 'g') end
  local s = load(g.st, 'g')
  if r and r[1] == 'a' then
    if s and r[5] ~= '' then s.x[1], s.x[2] = s.x[1] - tonumber(r[2]), s.x[2] - tonumber(r[3]) end
    redis.call('ZREM', g.exp, gid)
  end
  if s then
    charge(s, actual, tokens, hb, db, mb)
    save(s)
  end
  if keep then
    if not r then r = {'e', '0', '0', '0', '', '', '', '', '', '', '0', '0', '0'} end
    r[1], r[12] = 'c', string.format('%d', actual)
    redis.call('HSET', g.res, gid, table.concat(r, S))
    redis.call('ZADD', g.gc, now + g.ret, gid)
  elseif raw then
    redis.call('HDEL', g.res, gid)
  end
  return s
end
-- extend a held global record's expiry to max(its expiry, expires); 0 when there is none held
local function renew_global(g, gid, expires)
  local raw = redis.call('HGET', g.res, gid)
  if not raw then return 0 end
  local r = split(raw, S)
  if r[1] ~= 'a' then return 0 end
  local e = math.max(tonumber(r[4]), expires)
  r[4] = i2s(e)
  redis.call('HSET', g.res, gid, table.concat(r, S))
  redis.call('ZADD', g.exp, e, gid)
  return e
end
local function release_global(g, gid, keep)
  local raw = redis.call('HGET', g.res, gid)
  if not raw then return end
  local r = split(raw, S)
  if r[1] ~= 'a' then return end
  unreserve(g.st, r, nil)
  redis.call('ZREM', g.exp, gid)
  if keep then
    r[1] = 'r'
    redis.call('HSET', g.res, gid, table.concat(r, S))
    redis.call('ZADD', g.gc, tonumber(r[4]) + g.ret, gid)
  else
    redis.call('HDEL', g.res, gid)
  end
end
"""


def _chunks(source: str) -> dict[str, str]:
    """Helper name -> its source (constants under their own names), in definition order."""
    out: dict[str, str] = {}
    name = "_preamble"
    for line in source.splitlines(keepends=True):
        m = re.match(r"local (?:function )?([A-Za-z_][A-Za-z0-9_]*)", line)
        if m:
            name = m.group(1)
        elif line.startswith("--"):
            name = "_comment"
        out[name] = out.get(name, "") + line
    out.pop("_comment", None)
    out.pop("_preamble", None)
    return out


_CHUNKS = _chunks(_HELPERS)


def _prelude(body: str) -> str:
    """The helpers ``body`` uses, transitively, in definition order: a script defines only what it calls
    (every ``local function`` is a closure created on each EVALSHA, which costs time)."""
    needed: set[str] = set()
    frontier = [body]
    while frontier:
        text = frontier.pop()
        for name, src in _CHUNKS.items():
            if name not in needed and re.search(rf"\b{name}\b", text):
                needed.add(name)
                frontier.append(src)
    return "".join(src for name, src in _CHUNKS.items() if name in needed)


def _script(body: str) -> str:
    return _prelude(body) + body


# KEYS: mode 0 (standalone): req tst texp tres tgc gst gexp gres ggc; mode 1 (cluster, tenant slot): req tst texp
#       tres tgc; mode 2 (cluster, global slot): gst gexp gres ggc; mode 3 (cluster, tenant slot, after the global
#       slot refused): as mode 1, but it only answers a replay; anything else is answered rejected, nothing held.
# ARGV: int64s (now expires est_cost est_tokens tier hb db mb retention mode), res_id request_id tenant team
#       feature end_user model gc_now.
# The tenant record is the truth (kept for replays). The global record only carries the amount: deleted when
# settled in standalone mode, kept (with gc) in cluster mode so the global steps are idempotent.
# A request id whose reservation is held or committed replays it; one whose reservation was released or expired
# is admitted afresh under res_id. A res_id already recorded means this very call ran before (its reply was lost
# and it is run again): it answers that reservation as a replay, whatever its state, and never admits twice.
# Reply: {status, reservation id, expires, state, blocks...}; status 1 admitted, 0 rejected, 2 replayed; state
# a|c (e|r only for a re-run of res_id).
RESERVE = _script(
    r"""
local now, expires, ec, et, tier, hb, db, mb, ret, mode = struct.unpack('<i8i8i8i8i8i8i8i8i8i8', ARGV[1])
local now_s = math.floor(now / 1000)
local rid, reqid, tenant, team, feature, end_user, model = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  ARGV[8]
local gc_now = ARGV[9] == '1'
local doms = {}
if mode ~= 2 then
  local t = domain(KEYS, 2, ret)
  t.id, t.keep, t.req, t.sks = rid, true, KEYS[1], tenant_scopes(team, feature, end_user)
  doms[1] = t
end
if mode == 0 or mode == 2 then
  local g = domain(KEYS, mode == 0 and 6 or 1, ret)
  g.id, g.keep, g.sks = tenant .. S .. rid, mode == 2, {'g'}
  doms[#doms + 1] = g
end
local all = {}
for d = 1, #doms do
  local dom = doms[d]
  dom.snaps = {}
  purge(dom, now, dom.keep)
  if gc_now and dom.keep then gc(dom, dom.req, now) end
  for i = 1, #dom.sks do
    local s = load(dom.st, dom.sks[i])
    if s then
      rate(s, now_s)
      dom.snaps[#dom.snaps + 1] = s
      all[#all + 1] = s
    end
  end
end
local out = {0, '', 0, ''}
if mode ~= 2 then
  local id, raw = rid, redis.call('HGET', doms[1].res, rid)
  if not raw then
    id = redis.call('HGET', KEYS[1], reqid)
    if id then raw = redis.call('HGET', doms[1].res, id) end
  end
  if raw then
    local r = split(raw, S)
    if id == rid or r[1] == 'a' or r[1] == 'c' then
      out[1], out[2], out[3], out[4] = 2, id, tonumber(r[4]), r[1]
      for i = 1, #all do block(out, all[i], hb, db, mb) end
      return out
    end
  end
end
if mode == 3 then
  for i = 1, #all do block(out, all[i], hb, db, mb) end
  return out
end
for i = 1, #all do
  if not admits(all[i], ec, et, hb, db, mb) then
    for j = 1, #all do block(out, all[j], hb, db, mb) end
    return out
  end
end
for i = 1, #all do
  local s = all[i]
  s.x[1], s.x[2] = s.x[1] + ec, s.x[2] + et
  save(s)
  local p = policy(s)
  if p.r > 0 or p.k > 0 then count_rate(s, now_s, et) end
end
local sexp = i2s(expires)
for d = 1, #doms do
  local dom = doms[d]
  if dom.req or #dom.snaps > 0 then
    local sks = {}
    for i = 1, #dom.snaps do sks[i] = dom.snaps[i].sk end
    local rec = {'a', i2s(ec), i2s(et), sexp, table.concat(sks, '\30'), reqid, team, feature, end_user, model,
                 i2s(tier), '0', '0', ''}
    redis.call('HSET', dom.res, dom.id, table.concat(rec, S))
    redis.call('ZADD', dom.exp, expires, dom.id)
  end
end
if mode ~= 2 then redis.call('HSET', KEYS[1], reqid, rid) end
out[1], out[2], out[3], out[4] = 1, rid, expires, 'a'
for i = 1, #all do block(out, all[i], hb, db, mb) end
return out
"""
)


# KEYS: tst texp tres tgc u:m u:h u:d u:L meta [gst gexp gres ggc]
# ARGV: int64s (now actual in out cached tier saved hb db mb minute_ttl hour_ttl retention with_global),
#       res_id tenant model
# A held reservation is settled; an expired or released one is charged in full all the same (the work ran) and
# flagged late. Reply: {status, charged, over, late, tokens, blocks...}; status 1 committed, 2 replayed, -1 not
# found; late '' or the state the reservation was in when the commit came (e or r; a replay answers the first's).
COMMIT = _script(
    r"""
local now, actual, tin, tout, tcached, atier, saved, hb, db, mb, minute_ttl, hour_ttl, ret, with_g =
  struct.unpack('<i8i8i8i8i8i8i8i8i8i8i8i8i8i8', ARGV[1])
local rid, tenant, amodel = ARGV[2], ARGV[3], ARGV[4]
local t = domain(KEYS, 1, ret)
local g = nil
if with_g == 1 then g = domain(KEYS, 10, ret) end
purge(t, now, true)
if g then purge(g, now, false) end
local raw = redis.call('HGET', t.res, rid)
if not raw then return {-1} end
local r = split(raw, S)
local tokens = tin + tout
local loaded, list = {}, {}
for _, sk in ipairs(tenant_scopes(r[7], r[8], r[9])) do
  local s = load(t.st, sk)
  if s then
    loaded[sk] = s
    list[#list + 1] = s
  end
end
local out = {1, actual, 0, '', tokens}
if r[1] == 'c' then
  out[1], out[2], out[3], out[4] = 2, tonumber(r[12]), tonumber(r[13]), r[14] or ''
  for i = 1, #list do block(out, list[i], hb, db, mb) end
  if g then
    local gs = load(g.st, 'g')
    if gs then block(out, gs, hb, db, mb) end
  end
  return out
end
local late = 0
if r[1] == 'e' or r[1] == 'r' then out[4], late = r[1], 1 end
if r[1] == 'a' then
  unreserve(t.st, r, loaded)
  redis.call('ZREM', t.exp, rid)
end
local over = 0
if actual > tonumber(r[2]) then over = 1 end
out[3] = over
for i = 1, #list do
  charge(list[i], actual, tokens, hb, db, mb)
  save(list[i])
  block(out, list[i], hb, db, mb)
end
local model, tier = amodel, i2s(atier)
if model == '' then model = r[10] end
if atier == 0 then tier = r[11] end
add_usage({KEYS[5], KEYS[6], KEYS[7], KEYS[8]}, {minute_ttl, hour_ttl},
  r[7] .. S .. r[8] .. S .. model .. S .. tier .. S .. r[9],
  {actual, tin, tout, tcached, 1, saved, 0, over, late})
redis.call('HSETNX', KEYS[9], 'first', now)
r[1], r[12], r[13], r[14] = 'c', i2s(actual), i2s(over), out[4]
redis.call('HSET', t.res, rid, table.concat(r, S))
redis.call('ZADD', t.gc, now + ret, rid)
if g then
  local gs = settle_global(g, tenant .. S .. rid, actual, tokens, hb, db, mb, now, false)
  if gs then block(out, gs, hb, db, mb) end
end
return out
"""
)

# KEYS: tst texp tres tgc [gst gexp gres ggc]   ARGV: int64s (now retention with_global), res_id tenant
# Reply: {status, released, state}; status 1 released, 2 replayed (state says why), -1 not found.
RELEASE = _script(
    r"""
local now, ret, with_g = struct.unpack('<i8i8i8', ARGV[1])
local rid, tenant = ARGV[2], ARGV[3]
local t = domain(KEYS, 1, ret)
local g = nil
if with_g == 1 then g = domain(KEYS, 5, ret) end
purge(t, now, true)
if g then purge(g, now, false) end
local raw = redis.call('HGET', t.res, rid)
if not raw then return {-1, 0, ''} end
local r = split(raw, S)
if r[1] ~= 'a' then return {2, 0, r[1]} end
unreserve(t.st, r, nil)
redis.call('ZREM', t.exp, rid)
r[1] = 'r'
redis.call('HSET', t.res, rid, table.concat(r, S))
redis.call('ZADD', t.gc, now + ret, rid)
if g then release_global(g, tenant .. S .. rid, false) end
return {1, tonumber(r[2]), 'r'}
"""
)

# KEYS: tst texp tres tgc [gst gexp gres ggc]   ARGV: int64s (now expires retention with_global), res_id tenant
# Extends a held reservation's expiry to max(its expiry, expires), its global hold's too (standalone; cluster mode
# renews the global hold first, with GLOBAL_RENEW). Reply: {status, expires}; status 1 renewed, -1 not found,
# -2 settled (committed or released), -3 expired.
RENEW = _script(
    r"""
local now, expires, ret, with_g = struct.unpack('<i8i8i8i8', ARGV[1])
local rid, tenant = ARGV[2], ARGV[3]
local t = domain(KEYS, 1, ret)
local g = nil
if with_g == 1 then g = domain(KEYS, 5, ret) end
purge(t, now, true)
if g then purge(g, now, false) end
local raw = redis.call('HGET', t.res, rid)
if not raw then return {-1, 0} end
local r = split(raw, S)
if r[1] == 'e' then return {-3, 0} end
if r[1] ~= 'a' then return {-2, 0} end
local e = math.max(tonumber(r[4]), expires)
r[4] = i2s(e)
redis.call('HSET', t.res, rid, table.concat(r, S))
redis.call('ZADD', t.exp, e, rid)
if g then renew_global(g, tenant .. S .. rid, e) end
return {1, e}
"""
)

# Cluster mode, first step of RenewReservation on the global slot (so the global hold never expires before the
# tenant's). KEYS: gst gexp gres ggc   ARGV: int64s (now expires retention), gid   Reply: the new expiry, 0 if none.
GLOBAL_RENEW = _script(
    r"""
local now, expires, ret = struct.unpack('<i8i8i8', ARGV[1])
local g = domain(KEYS, 1, ret)
purge(g, now, true)
return renew_global(g, ARGV[2], expires)
"""
)

# Cluster mode, second step of Commit on the global slot. KEYS: gst gexp gres ggc
# ARGV: int64s (now actual tokens hb db mb retention), gid   Reply: the global block after settling ({} if none).
GLOBAL_SETTLE = _script(
    r"""
local now, actual, tokens, hb, db, mb, ret = struct.unpack('<i8i8i8i8i8i8i8', ARGV[1])
local g = domain(KEYS, 1, ret)
purge(g, now, true)
local s = settle_global(g, ARGV[2], actual, tokens, hb, db, mb, now, true)
local out = {}
if s then block(out, s, hb, db, mb) end
return out
"""
)

# Cluster mode: second step of Release (KEYS: gst gexp gres ggc; ARGV: int64s (now undo retention), gid), or the
# undo of a global hold whose tenant step did not admit (undo = 1: the record is deleted so a retry starts afresh).
GLOBAL_RELEASE = _script(
    r"""
local now, undo, ret = struct.unpack('<i8i8i8', ARGV[1])
local g = domain(KEYS, 1, ret)
purge(g, now, true)
release_global(g, ARGV[2], undo ~= 1)
if undo == 1 then
  redis.call('HDEL', g.res, ARGV[2])
  redis.call('ZREM', g.exp, ARGV[2])
end
return 1
"""
)

# KEYS: st exp res gc   ARGV: int64s (now hb db mb keep retention), scope_key   Reply: {block} or {} without a policy.
SNAPSHOT = _script(
    r"""
local now, hb, db, mb, keep, ret = struct.unpack('<i8i8i8i8i8i8', ARGV[1])
purge(domain(KEYS, 1, ret), now, keep == 1)
local s = load(KEYS[1], ARGV[2])
local out = {}
if s then
  rate(s, math.floor(now / 1000))
  block(out, s, hb, db, mb)
end
return out
"""
)

# KEYS: st   ARGV: scope_key json hb hc ht db dc dt mb mc mt lc lt   Reply: 1 when the policy already existed.
PUT_POLICY = r"""
local S = '\31'
local sk = ARGV[1]
local existed = redis.call('HEXISTS', KEYS[1], sk .. S .. 'p')
redis.call('HSET', KEYS[1], sk .. S .. 'p', ARGV[2])
if existed == 0 then
  local x = {0, 0}
  for i = 3, 13 do x[i] = tonumber(ARGV[i]) end
  redis.call('HSET', KEYS[1], sk .. S .. 's', struct.pack('<i8i8i8i8i8i8i8i8i8i8i8i8i8', unpack(x, 1, 13)))
end
return existed
"""

# KEYS: sav savgc u:m u:h u:d u:L meta   ARGV: now request_id dims saved hit gc_at minute_ttl hour_ttl gc_now
# Reply: 1 when replayed.
SAVINGS = _script(
    r"""
local now = tonumber(ARGV[1])
if ARGV[9] == '1' then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)
  for i = 1, #old do
    redis.call('HDEL', KEYS[1], old[i])
    redis.call('ZREM', KEYS[2], old[i])
  end
end
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[6]) == 0 then return 1 end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
add_usage({KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, {tonumber(ARGV[7]), tonumber(ARGV[8])}, ARGV[3],
  {0, 0, 0, 0, 0, tonumber(ARGV[4]), tonumber(ARGV[5]), 0, 0})
redis.call('HSETNX', KEYS[7], 'first', ARGV[1])
return 0
"""
)
