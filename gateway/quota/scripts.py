"""Lua scripts run by Redis: each checks and charges one key's limits atomically, in one round trip.

Every script receives the same thirteen keys, all under one hash tag `{<prefix>:<key id>}` so Redis
Cluster keeps them in one slot:

    1 meta  hash   the key record (hash, limits, revoked); its absence means "load me from SQLite"
    2 rq    zset   requests-per-minute log: lease -> admit time (ms)
    3 tk    zset   tokens-per-minute log: lease -> admit time (ms)
    4 tka   hash   tokens-per-minute amounts: lease -> tokens, and `_sum`
    5 cc    zset   concurrency leases: lease -> expiry (ms)
    6 res   zset   reservations still charged to the budgets: lease -> admit time (ms)
    7 done  zset   settled leases and replayed batches, for idempotent retries: id -> time (ms)
    8 bud   hash   budget counters: d<day number> and m<yyyymm> -> tokens (reserved or used)
    9 use   hash   usage: <day number>|<model>|p, |c, |r -> prompt tokens, completion tokens, requests;
                   `_day`: the day old fields were last pruned (kept 62 days; the hash expires when idle)
   10-13    m:<model>:rq, :tk, :tka, :bud — the same windows and budgets for this key on one model,
            used when the key has limits for that model (meta field `ml:<model>` = "rpm,tpm,tpd,tpmo")

Tokens-per-minute state: `tk` orders reservations by time, `tka` holds each one's amount, the running
sum `_sum`, and sums per time bucket `b<n>` (64 buckets per window). A refusal finds when enough
tokens free up by walking at most ~65 buckets, never the window's entries, so it costs the same with
10,000 entries as with ten; the Retry-After it computes is late by at most one bucket (window/64).

Time is Redis's own (TIME), so replicas with skewed clocks agree on windows and calendar days.
"""

from __future__ import annotations

_PRELUDE = r"""
local K = {meta=KEYS[1], rq=KEYS[2], tk=KEYS[3], tka=KEYS[4], cc=KEYS[5], res=KEYS[6], done=KEYS[7],
           bud=KEYS[8], use=KEYS[9]}
local MW = {rq=KEYS[10], tk=KEYS[11], tka=KEYS[12], bud=KEYS[13]}
local RES_KEEP = 86400000
local BUD_KEEP = 40 * 86400000
local USE_KEEP_DAYS = 62

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- days since 1970-01-01 -> yyyymm (H. Hinnant's civil_from_days)
local function month_of(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y * 100 + m
end

local function bucket_width(window)
  return math.max(1, math.floor(window / 64))
end

local function bump_bucket(W, ts, delta, bw)
  if delta == 0 or not ts then return end
  local f = 'b' .. math.floor(ts / bw)
  if redis.call('HINCRBY', W.tka, f, delta) <= 0 then redis.call('HDEL', W.tka, f) end
end

-- Drop entries older than the window from one set of window logs, keeping `_sum` and buckets exact.
local function purge_window(W, cutoff, bw)
  if not W.rq then return end
  redis.call('ZREMRANGEBYSCORE', W.rq, '-inf', cutoff)
  local old = redis.call('ZRANGEBYSCORE', W.tk, '-inf', cutoff, 'WITHSCORES')
  if #old == 0 then return end
  local freed = 0
  for i = 1, #old, 1000 do
    local ids, ts = {}, {}
    for j = i, math.min(i + 999, #old), 2 do
      ids[#ids + 1] = old[j]
      ts[#ts + 1] = tonumber(old[j + 1])
    end
    local amts = redis.call('HMGET', W.tka, unpack(ids))
    local per = {}
    for j = 1, #amts do
      local a = tonumber(amts[j]) or 0
      freed = freed + a
      local b = math.floor(ts[j] / bw)
      per[b] = (per[b] or 0) + a
    end
    redis.call('HDEL', W.tka, unpack(ids))
    for b, a in pairs(per) do bump_bucket(W, b * bw, -a, bw) end
  end
  redis.call('ZREMRANGEBYSCORE', W.tk, '-inf', cutoff)
  if redis.call('ZCARD', W.tk) == 0 then
    redis.call('DEL', W.tka)
  elseif freed ~= 0 then
    redis.call('HINCRBY', W.tka, '_sum', -freed)
  end
end

local function purge(now, window, keep_done)
  purge_window(K, now - window, bucket_width(window))
  redis.call('ZREMRANGEBYSCORE', K.cc, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K.res, '-inf', now - RES_KEEP)
  redis.call('ZREMRANGEBYSCORE', K.done, '-inf', now - keep_done)
end

local function tokens_in_window(W)
  return math.max(0, tonumber(redis.call('HGET', W.tka, '_sum')) or 0)
end

local function add_tokens(W, ts, id, amount, window)
  redis.call('ZADD', W.tk, ts, id)
  redis.call('HSET', W.tka, id, amount)
  redis.call('HINCRBY', W.tka, '_sum', amount)
  bump_bucket(W, ts, amount, bucket_width(window))
  redis.call('PEXPIRE', W.tk, window + 1000)
  redis.call('PEXPIRE', W.tka, window + 1000)
end

-- Change one reservation's amount (settle: down to the real use; cancel: to zero).
local function set_amount(W, id, amount, window)
  local amt = tonumber(redis.call('HGET', W.tka, id))
  if not amt then return end
  redis.call('HSET', W.tka, id, amount)
  redis.call('HINCRBY', W.tka, '_sum', amount - amt)
  bump_bucket(W, tonumber(redis.call('ZSCORE', W.tk, id)), amount - amt, bucket_width(window))
end

-- When the tokens of the oldest entries free `need` tokens: walks the ~65 buckets, not the entries.
local function tpm_retry(W, need, now, window)
  local bw = bucket_width(window)
  local first = redis.call('ZRANGE', W.tk, 0, 0, 'WITHSCORES')
  if not first[2] then return window end
  local i0 = math.floor(tonumber(first[2]) / bw)
  local fields = {}
  for i = i0, math.floor(now / bw) do fields[#fields + 1] = 'b' .. i end
  local vals = redis.call('HMGET', W.tka, unpack(fields))
  local freed = 0
  for j = 1, #vals do
    freed = freed + (tonumber(vals[j]) or 0)
    if freed >= need then return math.max(1, (i0 + j) * bw + window - now) end
  end
  return window
end

local function add_usage(day, model, p, c, r)
  local f = day .. '|' .. model .. '|'
  if p ~= 0 then redis.call('HINCRBY', K.use, f .. 'p', p) end
  if c ~= 0 then redis.call('HINCRBY', K.use, f .. 'c', c) end
  if r ~= 0 then redis.call('HINCRBY', K.use, f .. 'r', r) end
  -- Bounded: fields older than USE_KEEP_DAYS go once a day (SQLite keeps the history), and the
  -- hash of a key unused that long expires.
  local today = math.floor(now_ms() / 86400000)
  local pruned = tonumber(redis.call('HGET', K.use, '_day')) or 0
  if pruned < today then
    for _, f2 in ipairs(redis.call('HKEYS', K.use)) do
      local d = tonumber(string.match(f2, '^(%d+)|'))
      if d and d < today - USE_KEEP_DAYS then redis.call('HDEL', K.use, f2) end
    end
    redis.call('HSET', K.use, '_day', today)
  end
  redis.call('PEXPIRE', K.use, (USE_KEEP_DAYS + 1) * 86400000)
end

local function tidy_budgets(bud, day)
  redis.call('PEXPIRE', bud, BUD_KEEP)
  if redis.call('HLEN', bud) <= 6 then return end
  local min_month = month_of(day - 40)
  for _, f in ipairs(redis.call('HKEYS', bud)) do
    local n = tonumber(string.sub(f, 2))
    local kind = string.sub(f, 1, 1)
    if n == nil or (kind == 'd' and n < day - 2) or (kind == 'm' and n < min_month) then
      redis.call('HDEL', bud, f)
    end
  end
end

local function newest(zkey)
  local r = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if r[2] then return tonumber(r[2]) end
  return nil
end

-- The per-model limits of this key for `model`: rpm, tpm, tpd, tpmo (all 0 when it has none).
local function model_limits(model)
  local v = redis.call('HGET', K.meta, 'ml:' .. model)
  if not v then return 0, 0, 0, 0 end
  local a, b, c, d = string.match(v, '^(%d+),(%d+),(%d+),(%d+)$')
  return tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0, tonumber(d) or 0
end
"""

# ARGV: lease, reserve, window_ms, lease_ttl_ms, done_keep_ms, model
# Returns {'load'} | {status, now, day, month, rpm, rem_req, reset_req, tpm, rem_tok, reset_tok, retry}
# (for a refusal by the key's per-model limits, the numbers are the model's)
ADMIT = _PRELUDE + r"""
local lease = ARGV[1]
local reserve = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local keep_done = tonumber(ARGV[5])
local model = ARGV[6]
local m = redis.call('HMGET', K.meta, 'revoked', 'rpm', 'tpm', 'tpd', 'tpmo', 'maxc', 'exp', 'models')
if not m[1] then return {'load'} end
local now = now_ms()
local day = math.floor(now / 86400000)
local month = month_of(day)
if m[1] == '1' then return {'revoked', now, day, month, 0, 0, 0, 0, 0, 0, 0} end
if m[7] and m[7] ~= '' and now >= tonumber(m[7]) then return {'expired', now, day, month, 0, 0, 0, 0, 0, 0, 0} end
if m[8] and m[8] ~= '' then
  local allowed = false
  for _, name in ipairs(cjson.decode(m[8])) do
    if name == model then allowed = true end
  end
  if not allowed then return {'model_not_allowed', now, day, month, 0, 0, 0, 0, 0, 0, 0} end
end
local rpm, tpm = tonumber(m[2]) or 0, tonumber(m[3]) or 0
local tpd, tpmo, maxc = tonumber(m[4]) or 0, tonumber(m[5]) or 0, tonumber(m[6]) or 0
local mrpm, mtpm, mtpd, mtpmo = model_limits(model)
local by_model = mrpm + mtpm + mtpd + mtpmo > 0
purge(now, window, keep_done)
if by_model then purge_window(MW, now - window, bucket_width(window)) end
local dkey, mkey = 'd' .. day, 'm' .. month

-- One set of limits against one set of windows: status, retry, requests and tokens in the window.
local function check(W, prefix, l_rpm, l_tpm, l_tpd, l_tpmo, l_maxc)
  local nreq = redis.call('ZCARD', W.rq)
  local tsum = tokens_in_window(W)
  local b = redis.call('HMGET', W.bud, dkey, mkey)
  local bd, bm = tonumber(b[1]) or 0, tonumber(b[2]) or 0
  local status, retry = 'ok', 0
  if l_tpd > 0 and bd + reserve > l_tpd then
    status = 'tokens_per_day'
  elseif l_tpmo > 0 and bm + reserve > l_tpmo then
    status = 'tokens_per_month'
  elseif l_tpm > 0 and reserve > l_tpm then
    status = 'tpm_request_too_large'
  elseif l_maxc > 0 and redis.call('ZCARD', K.cc) >= l_maxc then
    status, retry = 'concurrency', 1000
  elseif l_rpm > 0 and nreq >= l_rpm then
    status = 'rpm'
    local r = redis.call('ZRANGE', W.rq, nreq - l_rpm, nreq - l_rpm, 'WITHSCORES')
    retry = tonumber(r[2]) + window - now
  elseif l_tpm > 0 and tsum + reserve > l_tpm then
    status = 'tpm'
    retry = tpm_retry(W, tsum + reserve - l_tpm, now, window)
  end
  if status ~= 'ok' then status = prefix .. status end
  return status, retry, nreq, tsum
end

local function charge(W, l_rpm, l_tpm)
  if l_rpm > 0 then
    redis.call('ZADD', W.rq, now, lease)
    redis.call('PEXPIRE', W.rq, window + 1000)
  end
  if l_tpm > 0 then add_tokens(W, now, lease, reserve, window) end
  redis.call('HINCRBY', W.bud, dkey, reserve)
  redis.call('HINCRBY', W.bud, mkey, reserve)
  tidy_budgets(W.bud, day)
end

local function answer(W, status, retry, l_rpm, l_tpm, nreq, tsum)
  local reset_r, reset_t = 0, 0
  if l_rpm > 0 then
    local n = newest(W.rq)
    if n then reset_r = n + window - now end
  end
  if l_tpm > 0 and tsum > 0 then
    local n = newest(W.tk)
    if n then reset_t = n + window - now end
  end
  return {status, now, day, month, l_rpm, l_rpm - nreq, reset_r, l_tpm, l_tpm - tsum, reset_t, retry}
end

-- A retried call for a lease already admitted (or settled) changes nothing.
local again = redis.call('ZSCORE', K.res, lease) or redis.call('ZSCORE', K.done, lease)
local status, retry, nreq, tsum = check(K, '', rpm, tpm, tpd, tpmo, maxc)
if again then return answer(K, 'ok', 0, rpm, tpm, nreq, tsum) end
if status ~= 'ok' then return answer(K, status, retry, rpm, tpm, nreq, tsum) end
if by_model then
  local ms, mr, mn, mt = check(MW, 'model_', mrpm, mtpm, mtpd, mtpmo, 0)
  if ms ~= 'ok' then return answer(MW, ms, mr, mrpm, mtpm, mn, mt) end
  charge(MW, mrpm, mtpm)
end
charge(K, rpm, tpm)
if rpm > 0 then nreq = nreq + 1 end
if tpm > 0 then tsum = tsum + reserve end
redis.call('ZADD', K.cc, now + ttl, lease)
redis.call('PEXPIRE', K.cc, ttl + 1000)
redis.call('ZADD', K.res, now, lease)
redis.call('PEXPIRE', K.res, RES_KEEP + 1000)
return answer(K, 'ok', 0, rpm, tpm, nreq, tsum)
"""

# ARGV: lease, reserve, prompt, completion, day, month, model, window_ms, done_keep_ms, cancel
# cancel=1: the request was never served (its admission's answer was lost): undo the reservation
# entirely, requests-per-minute entry included, and record no usage.
# Returns 'load' | 'dup' | 1 (reservation corrected) | 0 (reservation was gone: real use charged)
SETTLE = _PRELUDE + r"""
if redis.call('EXISTS', K.meta) == 0 then return 'load' end
local lease = ARGV[1]
local reserve, prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local day, month, model = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local window, keep_done = tonumber(ARGV[8]), tonumber(ARGV[9])
local cancel = ARGV[10] == '1'
local now = now_ms()
if redis.call('ZSCORE', K.done, lease) then return 'dup' end
redis.call('ZADD', K.done, now, lease)
redis.call('PEXPIRE', K.done, keep_done + 1000)
redis.call('ZREM', K.cc, lease)
local had = redis.call('ZREM', K.res, lease)
local used = prompt + completion
if cancel then used = 0 end
local dkey, mkey = 'd' .. day, 'm' .. month
local mrpm, mtpm, mtpd, mtpmo = model_limits(model)
local buds = {K.bud}
if redis.call('EXISTS', MW.bud) == 1 or mrpm + mtpm + mtpd + mtpmo > 0 then buds[2] = MW.bud end
if had == 1 then
  local refund = reserve - used
  for _, bud in ipairs(buds) do
    if refund ~= 0 then
      if redis.call('HEXISTS', bud, dkey) == 1 then redis.call('HINCRBY', bud, dkey, -refund) end
      if redis.call('HEXISTS', bud, mkey) == 1 then redis.call('HINCRBY', bud, mkey, -refund) end
    end
  end
  set_amount(K, lease, used, window)
  set_amount(MW, lease, used, window)
  if cancel then
    redis.call('ZREM', K.rq, lease)
    redis.call('ZREM', MW.rq, lease)
  end
elseif used ~= 0 then
  -- The reservation is gone (Redis lost it, the lease is older than a day, or the admission never
  -- ran): charge what was used.
  for _, bud in ipairs(buds) do
    redis.call('HINCRBY', bud, dkey, used)
    redis.call('HINCRBY', bud, mkey, used)
    tidy_budgets(bud, day)
  end
  local tpm = tonumber(redis.call('HGET', K.meta, 'tpm')) or 0
  if tpm > 0 then add_tokens(K, now, lease, used, window) end
  if mtpm > 0 then add_tokens(MW, now, lease, used, window) end
end
if not cancel then add_usage(day, model, prompt, completion, 1) end
return had
"""

# ARGV: lease_ttl_ms, lease ids...
RENEW = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return 1
"""

# Charges admitted without Redis ("open" mode), replayed when it is back.
# ARGV: batch id, window_ms, done_keep_ms, n_rows, then n_rows x (day, model, prompt, completion, requests),
#       then pairs (age_ms, tokens) for requests young enough to still count in the minute windows.
REPLAY = _PRELUDE + r"""
if redis.call('EXISTS', K.meta) == 0 then return 'load' end
local batch, window, keep_done = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
if redis.call('ZSCORE', K.done, batch) then return 'dup' end
redis.call('ZADD', K.done, now, batch)
redis.call('PEXPIRE', K.done, keep_done + 1000)
local n = tonumber(ARGV[4])
local i = 5
for _ = 1, n do
  local day, model = tonumber(ARGV[i]), ARGV[i + 1]
  local p, c, r = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  add_usage(day, model, p, c, r)
  if p + c ~= 0 then
    redis.call('HINCRBY', K.bud, 'd' .. day, p + c)
    redis.call('HINCRBY', K.bud, 'm' .. month_of(day), p + c)
  end
  i = i + 5
end
local m = redis.call('HMGET', K.meta, 'rpm', 'tpm')
local rpm, tpm = tonumber(m[1]) or 0, tonumber(m[2]) or 0
local j = 0
while i < #ARGV do
  local age, tokens = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  j = j + 1
  if age < window then
    local id = batch .. ':' .. j
    if rpm > 0 then
      redis.call('ZADD', K.rq, now - age, id)
      redis.call('PEXPIRE', K.rq, window + 1000)
    end
    if tpm > 0 and tokens > 0 then add_tokens(K, now - age, id, tokens, window) end
  end
  i = i + 2
end
tidy_budgets(K.bud, math.floor(now / 86400000))
return 1
"""

# Put a key record back after Redis lost it, with usage and budgets seeded from SQLite.
# ARGV: n_pairs, field/value pairs of the meta hash, then rows of (day, model, prompt, completion, requests)
LOAD = _PRELUDE + r"""
if redis.call('EXISTS', K.meta) == 1 then return 0 end
local n = tonumber(ARGV[1])
local i = 2
for _ = 1, n do
  redis.call('HSET', K.meta, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local now = now_ms()
local today = math.floor(now / 86400000)
local month = month_of(today)
local bd, bm = 0, 0
while i < #ARGV do
  local day, model = tonumber(ARGV[i]), ARGV[i + 1]
  local vals = {p = tonumber(ARGV[i + 2]), c = tonumber(ARGV[i + 3]), r = tonumber(ARGV[i + 4])}
  for kind, v in pairs(vals) do
    local f = day .. '|' .. model .. '|' .. kind
    if v > (tonumber(redis.call('HGET', K.use, f)) or 0) then redis.call('HSET', K.use, f, v) end
  end
  if day == today then bd = bd + vals.p + vals.c end
  if month_of(day) == month then bm = bm + vals.p + vals.c end
  i = i + 5
end
if bd > (tonumber(redis.call('HGET', K.bud, 'd' .. today)) or 0) then redis.call('HSET', K.bud, 'd' .. today, bd) end
if bm > (tonumber(redis.call('HGET', K.bud, 'm' .. month)) or 0) then redis.call('HSET', K.bud, 'm' .. month, bm) end
redis.call('PEXPIRE', K.use, (USE_KEEP_DAYS + 1) * 86400000)
redis.call('PEXPIRE', K.bud, BUD_KEEP)
return 1
"""

# Edit a record in place (admin): replace every field but keep a revocation (revocation is one-way).
# ARGV: field/value pairs of the meta hash. Returns 0 when there is no record to edit.
EDIT = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local revoked = redis.call('HMGET', KEYS[1], 'revoked', 'revoked_at')
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if revoked[1] == '1' then redis.call('HSET', KEYS[1], 'revoked', '1', 'revoked_at', revoked[2]) end
return 1
"""

# Test hook: the script's calendar arithmetic, checked against Python's datetime.
MONTH_OF = _PRELUDE + "return month_of(tonumber(ARGV[1]))"
