"""The Lua scripts behind bulk/redis_job_store.py: each state change is one atomic step in Redis.

Key order (KEYS): job, items, results, unfinished, expiry, callbacks, stored, then the script's
own (spool_bytes and/or stream). Item states are JSON of scalars only (cjson would turn an empty
list into an object), and results are stored as the worker's JSON text, never decoded here.
"""

from __future__ import annotations

# Shared by the scripts that can end a job (done, cancelled, failed).
_CLOSE = """
local function close_job(id, new_state, now, ttl)
  local job, unfinished, expiry, callbacks = KEYS[1], KEYS[4], KEYS[5], KEYS[6]
  local expires = now + ttl
  redis.call('HSET', job, 'state', new_state, 'finished_at', now, 'expires_at', expires)
  redis.call('SREM', unfinished, id)
  redis.call('ZADD', expiry, expires, id)
  if redis.call('HGET', job, 'callback_url') ~= '' then
    redis.call('HSET', job, 'callback_state', 'pending')
    redis.call('SADD', callbacks, id)
  end
end
"""

# Finish a job when no item is pending or running.
_FINISH = (
    _CLOSE
    + """
local function finish_if_done(id, now, ttl)
  local job = KEYS[1]
  local state = redis.call('HGET', job, 'state')
  if state ~= 'queued' and state ~= 'running' then return end
  local pending = tonumber(redis.call('HGET', job, 'n_pending'))
  local running = tonumber(redis.call('HGET', job, 'n_running'))
  if pending > 0 or running > 0 then return end
  if redis.call('HGET', job, 'started_at') == false then
    redis.call('HSET', job, 'started_at', now)
  end
  close_job(id, 'done', now, ttl)
end

local function settle(it, new_state, err)
  local job = KEYS[1]
  if it.state == 'claimed' then
    redis.call('HINCRBY', job, 'n_running', -1)
  else
    redis.call('HINCRBY', job, 'n_pending', -1)
  end
  redis.call('HINCRBY', job, 'n_' .. new_state, 1)
  it.state = new_state
  if err ~= '' then it.error = err end
end
"""
)

CREATE = """
local job, items, unfinished, expiry, stored, spool, stream =
  KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[7], KEYS[8], KEYS[9]
local id = ARGV[1]
local h = cjson.decode(ARGV[2])
local n = #ARGV - 2
local busy = redis.call('SCARD', unfinished)
if busy >= h.max_unfinished then
  return {'jobs', busy .. ' jobs are already queued or running (at most ' .. h.max_unfinished ..
    '); try again when one has finished'}
end
local kept = tonumber(redis.call('GET', stored) or '0')
if kept + n > h.max_stored then
  return {'stored', 'the job store is full (' .. kept .. ' items kept); try again when old ' ..
    'jobs have expired'}
end
local spooled = tonumber(redis.call('GET', spool) or '0')
if h.max_spool >= 0 and spooled + h.spool_bytes > h.max_spool then
  return {'spool', 'the uploads would pass the disk quota for jobs; try again later'}
end
redis.call('HSET', job, 'state', 'queued', 'created_at', h.now, 'expires_at', h.expires_at,
  'options', h.options, 'callback_url', h.callback_url, 'spool_dir', h.spool_dir,
  'spool_bytes', h.spool_bytes, 'total', n, 'n_pending', n, 'n_running', 0, 'n_done', 0,
  'n_error', 0, 'n_skipped', 0)
for i = 1, n do
  local it = cjson.decode(ARGV[i + 2])
  it.state = 'pending'
  it.attempts = 0
  redis.call('HSET', items, i - 1, cjson.encode(it))
  redis.call('XADD', stream, '*', 'job', id, 'index', i - 1)
end
redis.call('SADD', unfinished, id)
redis.call('ZADD', expiry, h.expires_at, id)
redis.call('INCRBY', stored, n)
redis.call('INCRBY', spool, h.spool_bytes)
return false
"""

CLAIM = (
    _FINISH
    + """
local job, items, stream = KEYS[1], KEYS[2], KEYS[8]
local idx, worker, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_attempts, msg, ttl, id = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), ARGV[7]
local function drop()
  redis.call('XACK', stream, 'workers', msg)
  redis.call('XDEL', stream, msg)
end
local state = redis.call('HGET', job, 'state')
local raw = redis.call('HGET', items, idx)
if not state or not raw then drop() return {'gone'} end
local it = cjson.decode(raw)
if it.state ~= 'pending' and it.state ~= 'claimed' then drop() return {'finished'} end
if state ~= 'queued' and state ~= 'running' then
  -- the job ended (cancelled, failed) while a dead worker held this item: it never runs
  settle(it, 'skipped', '')
  redis.call('HSET', items, idx, cjson.encode(it))
  drop()
  return {'finished'}
end
local attempts = (it.attempts or 0) + 1
if attempts > max_attempts then
  settle(it, 'error', 'gave up after ' .. max_attempts .. ' attempts (the worker kept stopping)')
  redis.call('HSET', items, idx, cjson.encode(it))
  drop()
  finish_if_done(id, now, ttl)
  return {'gaveup'}
end
if it.state == 'pending' then
  redis.call('HINCRBY', job, 'n_pending', -1)
  redis.call('HINCRBY', job, 'n_running', 1)
end
it.state = 'claimed'
it.attempts = attempts
it.claimed_by = worker
it.claimed_at = now
it.msg = msg
redis.call('HSET', items, idx, cjson.encode(it))
if state == 'queued' then
  redis.call('HSET', job, 'state', 'running', 'started_at', now)
end
return {'claimed', attempts, it.source, it.input_ref, redis.call('HGET', job, 'options')}
"""
)

RECORD = (
    _FINISH
    + """
local items, results, stream = KEYS[2], KEYS[3], KEYS[8]
local idx, new_state, result, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl, id = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local raw = redis.call('HGET', items, idx)
if not raw then return 0 end
local it = cjson.decode(raw)
if it.state ~= 'pending' and it.state ~= 'claimed' then return 0 end
settle(it, new_state, err)
if result ~= '' then redis.call('HSET', results, idx, result) end
if it.msg then
  redis.call('XACK', stream, 'workers', it.msg)
  redis.call('XDEL', stream, it.msg)
end
redis.call('HSET', items, idx, cjson.encode(it))
finish_if_done(id, now, ttl)
return 1
"""
)

CANCEL = (
    _CLOSE
    + """
local job, items = KEYS[1], KEYS[2]
local new_state, message, now, ttl, id =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local state = redis.call('HGET', job, 'state')
if not state then return 0 end
if state ~= 'queued' and state ~= 'running' then return 1 end
local skipped = 0
local all = redis.call('HGETALL', items)
for i = 1, #all, 2 do
  local it = cjson.decode(all[i + 1])
  if it.state == 'pending' then
    it.state = 'skipped'
    redis.call('HSET', items, all[i], cjson.encode(it))
    skipped = skipped + 1
  end
end
redis.call('HINCRBY', job, 'n_pending', -skipped)
redis.call('HINCRBY', job, 'n_skipped', skipped)
if message ~= '' then redis.call('HSET', job, 'error', message) end
close_job(id, new_state, now, ttl)
return 1
"""
)

RELEASE = """
local job, items, idx = KEYS[1], KEYS[2], ARGV[1]
local raw = redis.call('HGET', items, idx)
if not raw then return 0 end
local it = cjson.decode(raw)
if it.state ~= 'claimed' then return 0 end
it.state = 'pending'
it.claimed_by = nil
redis.call('HSET', items, idx, cjson.encode(it))
redis.call('HINCRBY', job, 'n_running', -1)
redis.call('HINCRBY', job, 'n_pending', 1)
return 1
"""
