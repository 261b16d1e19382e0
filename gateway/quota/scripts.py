"""Lua scripts run by Redis: each checks and charges one key's limits atomically, in one round trip.

Every script receives the same nine keys, all under one hash tag `{<prefix>:<key id>}` so Redis
Cluster keeps them in one slot:

    1 meta  hash   the key record (hash, limits, revoked); its absence means "load me from SQLite"
    2 rq    zset   requests-per-minute log: lease -> admit time (ms)
    3 tk    zset   tokens-per-minute log: lease -> admit time (ms)
    4 tka   hash   tokens-per-minute amounts: lease -> tokens, and `_sum`
    5 cc    zset   concurrency leases: lease -> expiry (ms)
    6 res   zset   reservations still charged to the budgets: lease -> admit time (ms)
    7 done  zset   settled leases and replayed batches, for idempotent retries: id -> time (ms)
    8 bud   hash   budget counters: d<day number> and m<yyyymm> -> tokens (reserved or used)
    9 use   hash   usage: <day number>|<model>|p, |c, |r -> prompt tokens, completion tokens, requests

Time is Redis's own (TIME), so replicas with skewed clocks agree on windows and calendar days.
"""

from __future__ import annotations

_PRELUDE = r"""
local K = {meta=KEYS[1], rq=KEYS[2], tk=KEYS[3], tka=KEYS[4], cc=KEYS[5], res=KEYS[6], done=KEYS[7],
           bud=KEYS[8], use=KEYS[9]}
local RES_KEEP = 86400000

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

local function purge(now, window, keep_done)
  local cutoff = now - window
  redis.call('ZREMRANGEBYSCORE', K.rq, '-inf', cutoff)
  local old = redis.call('ZRANGEBYSCORE', K.tk, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for i = 1, #old, 500 do
      local chunk = {}
      for j = i, math.min(i + 499, #old) do chunk[#chunk + 1] = old[j] end
      local amts = redis.call('HMGET', K.tka, unpack(chunk))
      for j = 1, #amts do freed = freed + (tonumber(amts[j]) or 0) end
      redis.call('HDEL', K.tka, unpack(chunk))
    end
    redis.call('ZREMRANGEBYSCORE', K.tk, '-inf', cutoff)
    if redis.call('ZCARD', K.tk) == 0 then
      redis.call('DEL', K.tka)
    elseif freed ~= 0 then
      redis.call('HINCRBY', K.tka, '_sum', -freed)
    end
  end
  redis.call('ZREMRANGEBYSCORE', K.cc, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K.res, '-inf', now - RES_KEEP)
  redis.call('ZREMRANGEBYSCORE', K.done, '-inf', now - keep_done)
end

local function tokens_in_window()
  return math.max(0, tonumber(redis.call('HGET', K.tka, '_sum')) or 0)
end

local function add_tokens(ts, id, amount, window)
  redis.call('ZADD', K.tk, ts, id)
  redis.call('HSET', K.tka, id, amount)
  redis.call('HINCRBY', K.tka, '_sum', amount)
  redis.call('PEXPIRE', K.tk, window + 1000)
  redis.call('PEXPIRE', K.tka, window + 1000)
end

local function add_usage(day, model, p, c, r)
  local f = day .. '|' .. model .. '|'
  if p ~= 0 then redis.call('HINCRBY', K.use, f .. 'p', p) end
  if c ~= 0 then redis.call('HINCRBY', K.use, f .. 'c', c) end
  if r ~= 0 then redis.call('HINCRBY', K.use, f .. 'r', r) end
end

local function tidy_budgets(day)
  if redis.call('HLEN', K.bud) <= 6 then return end
  local min_month = month_of(day - 40)
  for _, f in ipairs(redis.call('HKEYS', K.bud)) do
    local n = tonumber(string.sub(f, 2))
    local kind = string.sub(f, 1, 1)
    if n == nil or (kind == 'd' and n < day - 2) or (kind == 'm' and n < min_month) then
      redis.call('HDEL', K.bud, f)
    end
  end
end

local function newest(zkey)
  local r = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if r[2] then return tonumber(r[2]) end
  return nil
end
"""

# ARGV: lease, reserve, window_ms, lease_ttl_ms, done_keep_ms
# Returns {'load'} | {status, now, day, month, rpm, rem_req, reset_req, tpm, rem_tok, reset_tok, retry}
ADMIT = _PRELUDE + r"""
local lease = ARGV[1]
local reserve = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local keep_done = tonumber(ARGV[5])
local m = redis.call('HMGET', K.meta, 'revoked', 'rpm', 'tpm', 'tpd', 'tpmo', 'maxc')
if not m[1] then return {'load'} end
local now = now_ms()
local day = math.floor(now / 86400000)
local month = month_of(day)
if m[1] == '1' then return {'revoked', now, day, month, 0, 0, 0, 0, 0, 0, 0} end
local rpm, tpm = tonumber(m[2]) or 0, tonumber(m[3]) or 0
local tpd, tpmo, maxc = tonumber(m[4]) or 0, tonumber(m[5]) or 0, tonumber(m[6]) or 0
purge(now, window, keep_done)
local dkey, mkey = 'd' .. day, 'm' .. month
local nreq = redis.call('ZCARD', K.rq)
local tsum = tokens_in_window()
local status, retry = 'ok', 0
-- A retried call for a lease already admitted (or settled) changes nothing.
local again = redis.call('ZSCORE', K.res, lease) or redis.call('ZSCORE', K.done, lease)
if not again then
  local b = redis.call('HMGET', K.bud, dkey, mkey)
  local bd, bm = tonumber(b[1]) or 0, tonumber(b[2]) or 0
  if tpd > 0 and bd + reserve > tpd then
    status = 'tokens_per_day'
  elseif tpmo > 0 and bm + reserve > tpmo then
    status = 'tokens_per_month'
  elseif tpm > 0 and reserve > tpm then
    status = 'tpm_request_too_large'
  elseif maxc > 0 and redis.call('ZCARD', K.cc) >= maxc then
    status, retry = 'concurrency', 1000
  elseif rpm > 0 and nreq >= rpm then
    status = 'rpm'
    local r = redis.call('ZRANGE', K.rq, nreq - rpm, nreq - rpm, 'WITHSCORES')
    retry = tonumber(r[2]) + window - now
  elseif tpm > 0 and tsum + reserve > tpm then
    status = 'tpm'
    local need, freed = tsum + reserve - tpm, 0
    local entries = redis.call('ZRANGE', K.tk, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + (tonumber(redis.call('HGET', K.tka, entries[i])) or 0)
      if freed >= need then
        retry = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    if retry <= 0 then retry = window end
  end
  if status == 'ok' then
    if rpm > 0 then
      redis.call('ZADD', K.rq, now, lease)
      redis.call('PEXPIRE', K.rq, window + 1000)
      nreq = nreq + 1
    end
    if tpm > 0 then
      add_tokens(now, lease, reserve, window)
      tsum = tsum + reserve
    end
    redis.call('ZADD', K.cc, now + ttl, lease)
    redis.call('PEXPIRE', K.cc, ttl + 1000)
    redis.call('ZADD', K.res, now, lease)
    redis.call('PEXPIRE', K.res, RES_KEEP + 1000)
    redis.call('HINCRBY', K.bud, dkey, reserve)
    redis.call('HINCRBY', K.bud, mkey, reserve)
    tidy_budgets(day)
  end
end
local reset_r, reset_t = 0, 0
if rpm > 0 then
  local n = newest(K.rq)
  if n then reset_r = n + window - now end
end
if tpm > 0 and tsum > 0 then
  local n = newest(K.tk)
  if n then reset_t = n + window - now end
end
return {status, now, day, month, rpm, rpm - nreq, reset_r, tpm, tpm - tsum, reset_t, retry}
"""

# ARGV: lease, reserve, prompt, completion, day, month, model, window_ms, done_keep_ms
# Returns 'load' | 'dup' | 1 (reservation corrected) | 0 (reservation was gone: real use charged)
SETTLE = _PRELUDE + r"""
if redis.call('EXISTS', K.meta) == 0 then return 'load' end
local lease = ARGV[1]
local reserve, prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local day, month, model = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local window, keep_done = tonumber(ARGV[8]), tonumber(ARGV[9])
local now = now_ms()
if redis.call('ZSCORE', K.done, lease) then return 'dup' end
redis.call('ZADD', K.done, now, lease)
redis.call('PEXPIRE', K.done, keep_done + 1000)
redis.call('ZREM', K.cc, lease)
local had = redis.call('ZREM', K.res, lease)
local used = prompt + completion
local dkey, mkey = 'd' .. day, 'm' .. month
if had == 1 then
  local refund = reserve - used
  if refund ~= 0 then
    if redis.call('HEXISTS', K.bud, dkey) == 1 then redis.call('HINCRBY', K.bud, dkey, -refund) end
    if redis.call('HEXISTS', K.bud, mkey) == 1 then redis.call('HINCRBY', K.bud, mkey, -refund) end
  end
  local amt = tonumber(redis.call('HGET', K.tka, lease))
  if amt then
    redis.call('HSET', K.tka, lease, used)
    redis.call('HINCRBY', K.tka, '_sum', used - amt)
  end
else
  -- The reservation is gone (Redis lost it, or the lease is older than a day): charge what was used.
  if used ~= 0 then
    redis.call('HINCRBY', K.bud, dkey, used)
    redis.call('HINCRBY', K.bud, mkey, used)
    local tpm = tonumber(redis.call('HGET', K.meta, 'tpm')) or 0
    if tpm > 0 then add_tokens(now, lease, used, window) end
  end
end
add_usage(day, model, prompt, completion, 1)
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
    if tpm > 0 and tokens > 0 then add_tokens(now - age, id, tokens, window) end
  end
  i = i + 2
end
tidy_budgets(math.floor(now / 86400000))
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
return 1
"""

# Test hook: the script's calendar arithmetic, checked against Python's datetime.
MONTH_OF = _PRELUDE + "return month_of(tonumber(ARGV[1]))"
