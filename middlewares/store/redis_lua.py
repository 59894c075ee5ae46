"""The Lua scripts of the ``redis`` backend; each runs atomically on the server.

Every script touches only the keys it is given, all of one team (one ``{team}`` hash tag), so it
runs on Redis Cluster too. Amounts are compared as Lua numbers (doubles): exact below 2**53
nano-USD, which config bounds budgets to. Times are unix seconds from the caller's clock.
"""

from __future__ import annotations

__all__ = ["ADJUST", "ADMIT", "COMMIT", "HIT", "RELEASE", "RESERVE", "SETTLE", "STATUS"]

# KEYS: spent, held (hash id -> amount), expiry (zset id -> expires_at)
# ARGV: limit, amount, id, now, expires_at, ttl_ms
# -> {admitted (0/1), spent, reserved}
RESERVE = """
local now = tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for i = 1, #expired do redis.call('HDEL', KEYS[2], expired[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = 0
local amounts = redis.call('HVALS', KEYS[2])
for i = 1, #amounts do reserved = reserved + tonumber(amounts[i]) end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return {1, spent, reserved} end
local amount = tonumber(ARGV[2])
if spent + reserved + amount > tonumber(ARGV[1]) then return {0, spent, reserved} end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
local ttl = tonumber(ARGV[6])
for i = 2, 3 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return {1, spent, reserved + amount}
"""

# KEYS: spent, held, expiry, done, ledger
# ARGV: id, actual, retention_s, ledger score ('' for none), ledger member
# -> 1 when charged now, 0 when it was charged before
COMMIT = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('INCRBY', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5]) end
redis.call('SET', KEYS[4], '1', 'EX', ARGV[3])
return 1
"""

# KEYS: held, expiry; ARGV: id, now -> 1 when the reservation was live
RELEASE = """
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if expires and tonumber(expires) > tonumber(ARGV[2]) then return 1 end
return 0
"""

# KEYS: spent, held, expiry; ARGV: now -> {spent, live reserved}
STATUS = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf')
local reserved = 0
for i = 1, #live do reserved = reserved + tonumber(redis.call('HGET', KEYS[2], live[i]) or '0') end
return {spent, reserved}
"""

# KEYS: counter of one window; ARGV: limit, amount, ttl_ms -> {allowed (0/1), count}
HIT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[2])
if count + amount > tonumber(ARGV[1]) then return {0, count} end
count = redis.call('INCRBY', KEYS[1], amount)
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1, count}
"""

# KEYS: counter of one window; ARGV: delta
ADJUST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('INCRBY', KEYS[1], ARGV[1]) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
return 1
"""

# KEYS: the counter of each hit's window, then spent, held, expiry of each hold
# ARGV: hits, holds, id, now, expires_at, ttl_ms, then limit, amount, window ttl_ms of each hit,
#   then limit, amount of each hold
# -> {admitted (0/1), {{allowed, count}, ...}, {{admitted, spent, reserved}, ...}} with the
#   decisions up to the first refusal. HIT and RESERVE in order, as if one after the other, but
#   nothing is written unless every one is admitted.
ADMIT = """
local hits, holds, id, now = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local counts, windows = {}, {}
for i = 1, hits do
  local key, a = KEYS[i], 6 + 3 * (i - 1)
  local count = counts[key] or tonumber(redis.call('GET', key) or '0')
  local amount = tonumber(ARGV[a + 2])
  if count + amount > tonumber(ARGV[a + 1]) then
    windows[i] = {0, count}
    return {0, windows, {}}
  end
  counts[key] = count + amount
  windows[i] = {1, count + amount}
end
local budgets, added, reservations = {}, {}, {}
for i = 1, holds do
  local k, a = hits + 3 * (i - 1), 6 + 3 * hits + 2 * (i - 1)
  local budget = budgets[KEYS[k + 2]]
  if not budget then
    budget = {spent = tonumber(redis.call('GET', KEYS[k + 1]) or '0'), reserved = 0, live = false}
    local live = redis.call('ZRANGEBYSCORE', KEYS[k + 3], '(' .. ARGV[4], '+inf')
    for j = 1, #live do
      budget.reserved = budget.reserved + tonumber(redis.call('HGET', KEYS[k + 2], live[j]) or '0')
      if live[j] == id then budget.live = true end
    end
    budgets[KEYS[k + 2]] = budget
  end
  local amount = tonumber(ARGV[a + 2])
  if not budget.live then
    if budget.spent + budget.reserved + amount > tonumber(ARGV[a + 1]) then
      reservations[i] = {0, budget.spent, budget.reserved}
      return {0, windows, reservations}
    end
    budget.reserved, budget.live, added[i] = budget.reserved + amount, true, true
  end
  reservations[i] = {1, budget.spent, budget.reserved}
end
for i = 1, hits do
  local a = 6 + 3 * (i - 1)
  redis.call('INCRBY', KEYS[i], ARGV[a + 2])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[a + 3]) end
end
local ttl = tonumber(ARGV[6])
for i = 1, holds do
  local k, a = hits + 3 * (i - 1), 6 + 3 * hits + 2 * (i - 1)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[k + 3], '-inf', now)
  for j = 1, #expired do redis.call('HDEL', KEYS[k + 2], expired[j]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
  if added[i] then
    redis.call('HSET', KEYS[k + 2], id, ARGV[a + 2])
    redis.call('ZADD', KEYS[k + 3], ARGV[5], id)
    for j = 2, 3 do
      if redis.call('PTTL', KEYS[k + j]) < ttl then redis.call('PEXPIRE', KEYS[k + j], ttl) end
    end
  end
end
return {1, windows, reservations}
"""

# KEYS: spent, held, expiry, done of each budget, then the ledger, then the counter of each
#   adjusted window
# ARGV: budgets, adjustments, id, cost ('' to release), retention_s, then the delta of each
#   adjustment, then a ledger score and member per entry
# -> 1, or 0 when the first budget's commit was done before (then nothing changes). COMMIT (a
#   budget whose own commit was done before is skipped) or RELEASE of every budget, then ADJUST.
SETTLE = """
local budgets, adjustments, id, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
if cost ~= '' then
  if budgets > 0 and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
  local done = {}
  for i = 1, budgets do done[i] = redis.call('EXISTS', KEYS[4 * i]) == 1 end
  for i = 1, budgets do
    if not done[i] then
      local k = 4 * (i - 1)
      redis.call('HDEL', KEYS[k + 2], id)
      redis.call('ZREM', KEYS[k + 3], id)
      redis.call('INCRBY', KEYS[k + 1], cost)
      redis.call('SET', KEYS[k + 4], '1', 'EX', ARGV[5])
    end
  end
else
  for i = 1, budgets do
    redis.call('HDEL', KEYS[4 * i - 2], id)
    redis.call('ZREM', KEYS[4 * i - 1], id)
  end
end
for i = 1, adjustments do
  local key = KEYS[4 * budgets + 1 + i]
  if redis.call('EXISTS', key) == 1 and redis.call('INCRBY', key, ARGV[5 + i]) < 0 then
    redis.call('SET', key, 0, 'KEEPTTL')
  end
end
for i = 6 + adjustments, #ARGV, 2 do
  redis.call('ZADD', KEYS[4 * budgets + 1], ARGV[i], ARGV[i + 1])
end
return 1
"""
