-- A user who went dead and was queued again (a profile edit, a trigger) kept the old dead
-- row after the new attempt succeeded, so status and dead-letter listings still showed
-- them dead. Completing a user's row now also removes that user's dead rows in the event.
-- Dead rows are taken with SKIP LOCKED: mm_redrive may hold them while it inserts a live
-- row (which we hold), so waiting here could deadlock; a row redrive holds it deletes
-- itself.

-- As in 0007, plus the removal of the completed users' dead rows.
CREATE OR REPLACE FUNCTION mm_complete(p_queue_ids bigint[], p_token uuid) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    deleted integer;
    requeued integer;
BEGIN
    PERFORM 1 FROM matchmaking_queue l WHERE l.id = ANY (p_queue_ids)
      ORDER BY l.event_id, l.profile_id, l.id FOR UPDATE;

    -- The dead rows of the users this call completes (fenced like the rows themselves).
    DELETE FROM matchmaking_queue d
     WHERE d.id IN (SELECT dead.id
                      FROM matchmaking_queue dead
                      JOIN matchmaking_queue done
                        ON done.event_id = dead.event_id AND done.profile_id = dead.profile_id
                     WHERE done.id = ANY (p_queue_ids) AND done.lease_token = p_token
                       AND done.status = 'running' AND dead.status = 'dead'
                     ORDER BY dead.event_id, dead.profile_id, dead.id
                       FOR UPDATE OF dead SKIP LOCKED);

    -- Delete first: an enqueue racing with us either sees the row gone (and inserts a
    -- fresh one) or has set rerun_requested, which keeps the row for the UPDATE below.
    DELETE FROM matchmaking_queue q
     WHERE q.id = ANY (p_queue_ids) AND q.lease_token = p_token
       AND q.status = 'running' AND NOT q.rerun_requested;
    GET DIAGNOSTICS deleted = ROW_COUNT;

    UPDATE matchmaking_queue q
       -- the original request is done: the rerun runs at the priority it asked for
       SET status = 'pending', priority = coalesce(q.rerun_priority, q.priority),
           reason = 'rerun', attempts = 0, rerun_requested = false, rerun_priority = NULL,
           lease_token = NULL, lease_expires_at = NULL, run_after = now(), last_error = NULL,
           updated_at = now()
     WHERE q.id = ANY (p_queue_ids) AND q.lease_token = p_token AND q.status = 'running';
    GET DIAGNOSTICS requeued = ROW_COUNT;
    RETURN deleted + requeued;
END
$$;
