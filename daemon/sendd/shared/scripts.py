"""The Lua scripts that keep the fleet's limits in Redis, each one round trip and atomic.

The limits are the same exact sliding-window logs as the daemon's own (sendd.core.ratelimit):
never more than `limit` units in any window of `window` seconds. Each log is a Redis list of
"time:units" grants in non-decreasing time order beside a key holding their sum, so a grant of
`units` fits at time `at` when what is still in (at - window, at] plus `units` is within the
limit; a GCRA bucket would let a bulk batch through at the end of one window and another at the
start of the next (up to twice the limit in a window that straddles them).

Time is Redis's (TIME), never a daemon's: their clocks may disagree. Times are microseconds
in integers: Redis turns a Lua number into an integer on the way out.

A Redis that has just started holds no grants, although the fleet may have sent a full window
just before (a restart loses the data): the first script to find the fleet's hash missing sets a
hold of `hold` seconds during which nothing is granted. A daemon coming back from its local
share (Redis was unreachable) sets the same hold, since the grants it made meanwhile are not
in the logs.
"""

from __future__ import annotations

# KEYS: 1 fleet hash, 2 account hash (backoff, effective limits), then a log and its sum for
#       the account's messages (3, 4), its requests (5, 6) and the tenant's messages (7, 8).
# ARGV: 1 window s, 2 lead s (the grant's time after now), 3 hold s (on a fresh Redis),
#       4 account msgs/s, 5 account reqs/s, 6 tenant msgs/s (0: unlimited), 7 units,
#       8 requests, 9 the time of an earlier grant of these units to drop first ("": none; a
#       batch that missed its grant and was not sent), 10 the daemon's instance id.
# Returns {granted 0/1, wait µs, reason, effective msgs/s, effective reqs/s, the grant's time
# (Redis's clock, as stored; "" when refused)}.
RESERVE = """
local window = tonumber(ARGV[1])
local lead = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6

local function effective(configured, field)
  local stored = tonumber(redis.call('HGET', KEYS[2], field) or '0')
  if configured > 0 and stored > 0 and stored < configured then return stored end
  return configured
end
local msgs = effective(tonumber(ARGV[4]), 'msgs')
local reqs = effective(tonumber(ARGV[5]), 'reqs')
local function refuse(wait, reason)
  return {0, math.ceil(wait * 1e6), reason, msgs, reqs, ''}
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  local hold = string.format('%.6f', now + tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'born', string.format('%.6f', now), 'hold_until', hold)
end
local hold_until = tonumber(redis.call('HGET', KEYS[1], 'hold_until') or '0')
if hold_until > now then return refuse(hold_until - now, 'hold') end
local not_before = tonumber(redis.call('HGET', KEYS[2], 'not_before') or '0')
if not_before > now then return refuse(not_before - now, 'backoff') end
-- The provider is down for another daemon (its breaker is open): it probes, the others wait.
local down = redis.call('HMGET', KEYS[2], 'down_until', 'down_by')
if tonumber(down[1] or '0') > now and down[2] ~= ARGV[10] then
  return refuse(tonumber(down[1]) - now, 'breaker')
end

local units, requests = tonumber(ARGV[7]), tonumber(ARGV[8])
local logs = {}
if msgs > 0 then table.insert(logs, {KEYS[3], KEYS[4], msgs, units}) end
if reqs > 0 then table.insert(logs, {KEYS[5], KEYS[6], reqs, requests}) end
local tenant = tonumber(ARGV[6])
if tenant > 0 then table.insert(logs, {KEYS[7], KEYS[8], tenant, units}) end

local function parse(entry)
  local sep = string.find(entry, ':', 1, true)
  return tonumber(string.sub(entry, 1, sep - 1)), tonumber(string.sub(entry, sep + 1))
end

-- From entry `first` on: the index of the first grant still in the window at time `t`, and
-- `total` less the units of those before it.
local function in_window(entries, first, total, t)
  while first <= #entries do
    local granted, n = parse(entries[first])
    if granted + window > t then break end
    total = total - n
    first = first + 1
  end
  return first, total
end

-- Forget what left the window before now (and the grant replaced); the rest, oldest first.
local at = now + lead
local kept = {}
for i, log in ipairs(logs) do
  if ARGV[9] ~= '' and redis.call('LREM', log[1], 1, ARGV[9] .. ':' .. log[4]) == 1 then
    redis.call('DECRBY', log[2], log[4])
  end
  local entries = redis.call('LRANGE', log[1], 0, -1)
  local first, total = in_window(entries, 1, tonumber(redis.call('GET', log[2]) or '0'), now)
  if first > 1 then
    redis.call('LTRIM', log[1], first - 1, -1)
    redis.call('SET', log[2], total)
  end
  local last = entries[#entries]
  if first <= #entries then
    local t = parse(last)
    if t > at then at = t end
  end
  kept[i] = {entries, first, total}
end

-- The earliest time each log lets the units in, from `at` on; the latest of them fits all.
local earliest = at
for i, log in ipairs(logs) do
  local entries, first, total = kept[i][1], kept[i][2], kept[i][3]
  local capacity = math.max(log[3], log[4])
  local j, inside = in_window(entries, first, total, at)
  if inside + log[4] > capacity then
    local need = inside + log[4] - capacity
    while j <= #entries do
      local t, n = parse(entries[j])
      need = need - n
      if need <= 0 then
        if t + window > earliest then earliest = t + window end
        break
      end
      j = j + 1
    end
  end
end
if earliest > at then return refuse(earliest - at, 'rate') end

local ttl = math.ceil(window * 2000) + 1000
local stamp = string.format('%.6f', at)
for _, log in ipairs(logs) do
  redis.call('RPUSH', log[1], stamp .. ':' .. log[4])
  redis.call('INCRBY', log[2], log[4])
  redis.call('PEXPIRE', log[1], ttl)
  redis.call('PEXPIRE', log[2], ttl)
end
return {1, math.ceil((at - now) * 1e6), 'granted', msgs, reqs, stamp}
"""

# A 429: halve the account's effective limits for the fleet (never below 1) and keep a
# Retry-After. KEYS: 1 account hash. ARGV: 1 msgs/s, 2 reqs/s configured, 3 retry-after s.
PENALIZE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
for i, field in ipairs({'msgs', 'reqs'}) do
  local configured = tonumber(ARGV[i])
  if configured > 0 then
    local stored = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    local current = (stored > 0 and stored < configured) and stored or configured
    redis.call('HSET', KEYS[1], field, math.max(1, math.floor(current / 2)))
  end
end
local retry_after = tonumber(ARGV[3])
if retry_after > 0 then
  local until_ = now + retry_after
  local stored = tonumber(redis.call('HGET', KEYS[1], 'not_before') or '0')
  if until_ > stored then
    redis.call('HSET', KEYS[1], 'not_before', string.format('%.6f', until_))
  end
end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""

# A success: grow the effective limits back by a tenth of the configured ones.
# KEYS: 1 account hash. ARGV: 1 msgs/s, 2 reqs/s configured.
REWARD = """
for i, field in ipairs({'msgs', 'reqs'}) do
  local configured = tonumber(ARGV[i])
  local stored = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if stored > 0 then
    local grown = stored + math.ceil(configured / 10)
    if configured <= 0 or grown >= configured then
      redis.call('HDEL', KEYS[1], field)
    else
      redis.call('HSET', KEYS[1], field, grown)
    end
  end
end
return 1
"""

# A daemon's breaker of the account is open (the provider is unreachable): the others hold
# its batches until `seconds` from now (the next probe), unless it says the provider is back
# first. KEYS: 1 account hash. ARGV: 1 seconds, 2 instance id.
PROVIDER_DOWN = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call('HSET', KEYS[1], 'down_until', string.format('%.6f', now + tonumber(ARGV[1])),
           'down_by', ARGV[2])
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""

# The provider answered again. KEYS: 1 account hash.
PROVIDER_UP = """
redis.call('HDEL', KEYS[1], 'down_until', 'down_by')
return 1
"""

# A daemon back from its local share: hold the fleet until the grants it made alone have left
# the window (and the others have noticed Redis is back). KEYS: 1 fleet hash. ARGV: 1 hold s.
REJOIN = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local until_ = now + tonumber(ARGV[1])
local stored = tonumber(redis.call('HGET', KEYS[1], 'hold_until') or '0')
if until_ > stored then redis.call('HSET', KEYS[1], 'hold_until', string.format('%.6f', until_)) end
if redis.call('HEXISTS', KEYS[1], 'born') == 0 then
  redis.call('HSET', KEYS[1], 'born', string.format('%.6f', now))
end
return math.ceil((math.max(until_, stored) - now) * 1e6)
"""
