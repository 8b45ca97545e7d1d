-- Queue one delivery of an existing outbox entry to one endpoint (lib.lua is prepended):
-- a resend, or a caller outside the fan-out. Nothing is queued for a missing endpoint or entry.
-- ARGV (after the templates): tenant id, endpoint id, entry id, session id ('-': none), now (ms),
-- the wake-up channel (a message wakes the workers' delivery loops)
-- Reply: the queue's length after the push (1: deliverable now), 0 when nothing was queued.
local tid, weid, eid, sid, now = ARGV[NT + 1], ARGV[NT + 2], ARGV[NT + 3], ARGV[NT + 4], tonumber(ARGV[NT + 5])
if redis.call('EXISTS', string.format(T.endpoint, tid, weid)) == 0 then return 0 end
if #redis.call('XRANGE', string.format(T.events, tid), eid, eid) == 0 then return 0 end
local n = wh_enqueue(tid, weid, sid, eid, now)
redis.call('PUBLISH', ARGV[NT + 6], tid)
return n
