"""The Lua scripts of the ``redis`` backend; each runs atomically on the server.

Every script touches only the keys it is given, all of one team (one ``{team}`` hash tag), so it
runs on Redis Cluster too. Amounts are compared as Lua numbers (doubles): exact below 2**53
nano-USD, which config bounds budgets to. Times are unix seconds from the caller's clock.
"""

from __future__ import annotations

__all__ = ["ADJUST", "COMMIT", "HIT", "RELEASE", "RESERVE", "STATUS"]

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
