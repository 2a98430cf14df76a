-- The matching queue, per-event jobs and the batch log, with the SQL functions the
-- worker uses. Modelled on pgmq / Procrastinate / River: claim with SKIP LOCKED, attempts
-- counted at claim time, leases fenced by a token, done rows deleted.

CREATE TABLE matchmaking_queue (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    profile_id       bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    -- 3 newcomer, 2 profile update / dismissal, 1 neighbour lost someone, 0 rematch
    priority         smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 3),
    reason           text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_token      uuid,
    lease_expires_at timestamptz,
    -- set when a new request arrives while the row is running: complete re-queues it
    rerun_requested  boolean NOT NULL DEFAULT false,
    rerun_priority   smallint,
    last_error       text,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    dead_at          timestamptz,
    CHECK ((status = 'running') = (lease_token IS NOT NULL))
);
-- At most one live row per (event, user): duplicates coalesce through ON CONFLICT.
CREATE UNIQUE INDEX matchmaking_queue_live_key
    ON matchmaking_queue (event_id, profile_id) WHERE status IN ('pending', 'running');
-- Matches the claim's WHERE and ORDER BY exactly.
CREATE INDEX matchmaking_queue_claim_idx
    ON matchmaking_queue (event_id, priority DESC, run_after, id) WHERE status = 'pending';
CREATE INDEX matchmaking_queue_profile_idx ON matchmaking_queue (profile_id);  -- FK cascade
CREATE INDEX matchmaking_queue_lease_idx
    ON matchmaking_queue (lease_expires_at) WHERE status = 'running';
CREATE INDEX matchmaking_queue_dead_idx
    ON matchmaking_queue (event_id, dead_at) WHERE status = 'dead';

CREATE TABLE matchmaking_jobs (
    event_id        bigint PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'idle'
                    CHECK (status IN ('idle', 'running', 'paused', 'done')),
    processed_count bigint NOT NULL DEFAULT 0,
    failed_count    bigint NOT NULL DEFAULT 0,
    dead_count      bigint NOT NULL DEFAULT 0,
    lists_written   bigint NOT NULL DEFAULT 0,
    batches         bigint NOT NULL DEFAULT 0,
    -- bumped by every writer of user_matches (under the event lock): workers compare it
    -- with their cached copy to know whether their in-memory lists are still current
    lists_version   bigint NOT NULL DEFAULT 0,
    started_at      timestamptz,
    finished_at     timestamptz,
    last_batch_at   timestamptz,
    last_claimed_at timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE matchmaking_batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    worker_id     text NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    claimed       integer NOT NULL,
    completed     integer NOT NULL,
    failed        integer NOT NULL,
    lists_written integer NOT NULL,
    error         text
);
CREATE INDEX matchmaking_batches_event_idx ON matchmaking_batches (event_id, finished_at);

-- One advisory-lock key per event; every writer of an event's lists holds it.
CREATE FUNCTION mm_event_lock_key(p_event_id bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (x'4d4d'::bigint << 48) | p_event_id $$;

-- Enqueue users of one event, coalescing with any live row. Returns rows touched.
CREATE FUNCTION mm_enqueue(p_event_id bigint, p_profile_ids bigint[], p_priority smallint,
                           p_reason text) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    touched integer;
BEGIN
    INSERT INTO matchmaking_queue AS q (event_id, profile_id, priority, reason)
    SELECT DISTINCT p_event_id, pid, p_priority, p_reason
      FROM unnest(p_profile_ids) AS pid
    ON CONFLICT (event_id, profile_id) WHERE status IN ('pending', 'running')
    DO UPDATE SET
        -- a pending row takes the higher priority and runs now (a new change may fix
        -- what made it back off); a running row is asked to run once more when done
        priority = CASE WHEN q.status = 'pending'
                        THEN greatest(q.priority, EXCLUDED.priority) ELSE q.priority END,
        reason = CASE WHEN q.status = 'pending' AND EXCLUDED.priority > q.priority
                      THEN EXCLUDED.reason ELSE q.reason END,
        run_after = CASE WHEN q.status = 'pending'
                         THEN least(q.run_after, now()) ELSE q.run_after END,
        rerun_requested = q.rerun_requested OR q.status = 'running',
        rerun_priority = CASE WHEN q.status = 'running'
                              THEN greatest(coalesce(q.rerun_priority, 0), EXCLUDED.priority)
                              ELSE q.rerun_priority END,
        updated_at = now();
    GET DIAGNOSTICS touched = ROW_COUNT;

    -- Touch the job row only when its status must change: a worker's batch locks the
    -- job row before the queue rows it completes, so locking them in the opposite order
    -- here on every enqueue would deadlock with it.
    IF touched > 0 THEN
        UPDATE matchmaking_jobs j
           SET status = 'running', started_at = now(), finished_at = NULL, updated_at = now()
         WHERE j.event_id = p_event_id AND j.status IN ('idle', 'done');
        IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM matchmaking_jobs j
                                      WHERE j.event_id = p_event_id) THEN
            INSERT INTO matchmaking_jobs (event_id, status, started_at)
            VALUES (p_event_id, 'running', now())
            ON CONFLICT (event_id) DO NOTHING;
        END IF;
    END IF;
    RETURN touched;
END
$$;

-- Claim up to p_batch_size ready rows of ONE event. Events with ready work take turns
-- (least recently claimed first), so a huge backlog cannot starve a small event; within
-- the event, highest priority first, then oldest.
CREATE FUNCTION mm_claim(p_batch_size integer, p_lease_seconds double precision,
                         p_event_id bigint DEFAULT NULL)
RETURNS TABLE (queue_id bigint, event_id bigint, profile_id bigint, priority smallint,
               reason text, attempts integer, lease_token uuid)
LANGUAGE plpgsql
AS $$
DECLARE
    v_event bigint;
    v_token uuid := gen_random_uuid();
BEGIN
    -- A caller may ask for one event (synchronous matching); otherwise events with
    -- pending rows, found by a skip scan over the claim index (cheap with
    -- thousands of events); the job row only orders them and says whether it is paused.
    WITH RECURSIVE queued_events AS (
        (SELECT q.event_id FROM matchmaking_queue q
          WHERE q.status = 'pending' ORDER BY q.event_id LIMIT 1)
        UNION ALL
        SELECT (SELECT q.event_id FROM matchmaking_queue q
                 WHERE q.status = 'pending' AND q.event_id > e.event_id
                 ORDER BY q.event_id LIMIT 1)
          FROM queued_events e
         WHERE e.event_id IS NOT NULL
    )
    SELECT e.event_id INTO v_event
      FROM queued_events e
      LEFT JOIN matchmaking_jobs j ON j.event_id = e.event_id
     WHERE e.event_id IS NOT NULL
       AND (p_event_id IS NULL OR e.event_id = p_event_id)
       AND coalesce(j.status, 'running') <> 'paused'
       AND EXISTS (SELECT 1 FROM matchmaking_queue q
                    WHERE q.event_id = e.event_id AND q.status = 'pending'
                      AND q.run_after <= now())
     ORDER BY j.last_claimed_at NULLS FIRST, e.event_id
     LIMIT 1;
    IF v_event IS NULL THEN
        RETURN;
    END IF;

    UPDATE matchmaking_jobs j
       SET last_claimed_at = clock_timestamp(),
           status = CASE WHEN j.status IN ('idle', 'done') THEN 'running' ELSE j.status END
     WHERE j.event_id = v_event;

    RETURN QUERY
    WITH picked AS MATERIALIZED (
        SELECT q.id FROM matchmaking_queue q
         WHERE q.event_id = v_event AND q.status = 'pending' AND q.run_after <= now()
         ORDER BY q.priority DESC, q.run_after, q.id
         LIMIT p_batch_size
           FOR UPDATE SKIP LOCKED
    )
    UPDATE matchmaking_queue q
       SET status = 'running',
           attempts = q.attempts + 1,
           lease_token = v_token,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           updated_at = now()
      FROM picked
     WHERE q.id = picked.id
    RETURNING q.id, q.event_id, q.profile_id, q.priority, q.reason, q.attempts, q.lease_token;
END
$$;

-- Finish claimed rows. Fenced by the lease token: a worker whose lease was recovered
-- completes nothing. Rows asked to rerun go back to pending; the others are deleted.
CREATE FUNCTION mm_complete(p_queue_ids bigint[], p_token uuid) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    deleted integer;
    requeued integer;
BEGIN
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

-- Record failures (one error text per row). Capped exponential backoff with jitter;
-- dead after p_max_attempts. Returns the rows this call actually changed.
CREATE FUNCTION mm_fail(p_queue_ids bigint[], p_errors text[], p_token uuid,
                        p_max_attempts integer, p_backoff_base_s double precision,
                        p_backoff_max_s double precision)
RETURNS TABLE (queue_id bigint, event_id bigint, profile_id bigint, status text,
               attempts integer, last_error text)
LANGUAGE sql
AS $$
    UPDATE matchmaking_queue q
       -- an edit that arrived during the attempt is a new request: it gets fresh
       -- attempts instead of being buried with the dead row
       SET status = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                         THEN 'dead' ELSE 'pending' END,
           dead_at = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                          THEN now() END,
           attempts = CASE WHEN q.rerun_requested THEN 0 ELSE q.attempts END,
           priority = greatest(q.priority, coalesce(q.rerun_priority, 0)),
           rerun_requested = false, rerun_priority = NULL,
           run_after = now() + make_interval(secs =>
               least(p_backoff_max_s, p_backoff_base_s * 2 ^ greatest(q.attempts - 1, 0))
               * (0.5 + random() / 2)),
           lease_token = NULL, lease_expires_at = NULL,
           last_error = left(f.error, 2000), updated_at = now()
      FROM unnest(p_queue_ids, p_errors) AS f(id, error)
     WHERE q.id = f.id AND q.lease_token = p_token AND q.status = 'running'
    RETURNING q.id, q.event_id, q.profile_id, q.status, q.attempts, q.last_error;
$$;

-- Rows whose worker vanished (crash, timeout, OOM): back to pending, or dead when their
-- attempts (counted at claim) are used up. Run at the start of every invocation.
CREATE FUNCTION mm_recover_leases(p_max_attempts integer)
RETURNS TABLE (queue_id bigint, event_id bigint, profile_id bigint, status text,
               attempts integer, last_error text)
LANGUAGE sql
AS $$
    UPDATE matchmaking_queue q
       SET status = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                         THEN 'dead' ELSE 'pending' END,
           dead_at = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                          THEN now() END,
           attempts = CASE WHEN q.rerun_requested THEN 0 ELSE q.attempts END,
           priority = greatest(q.priority, coalesce(q.rerun_priority, 0)),
           rerun_requested = false, rerun_priority = NULL,
           lease_token = NULL, lease_expires_at = NULL, run_after = now(),
           last_error = 'lease expired: the worker crashed or ran out of time',
           updated_at = now()
     WHERE q.status = 'running' AND q.lease_expires_at < now()
    RETURNING q.id, q.event_id, q.profile_id, q.status, q.attempts, q.last_error;
$$;

-- Queue figures for one event (admin status, CLI status).
CREATE FUNCTION mm_queue_stats(p_event_id bigint)
RETURNS TABLE (pending_p0 bigint, pending_p1 bigint, pending_p2 bigint, pending_p3 bigint,
               ready bigint, running bigint, dead bigint,
               oldest_pending_age_s double precision)
LANGUAGE sql STABLE
AS $$
    SELECT count(*) FILTER (WHERE status = 'pending' AND priority = 0),
           count(*) FILTER (WHERE status = 'pending' AND priority = 1),
           count(*) FILTER (WHERE status = 'pending' AND priority = 2),
           count(*) FILTER (WHERE status = 'pending' AND priority = 3),
           count(*) FILTER (WHERE status = 'pending' AND run_after <= now()),
           count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'dead'),
           extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE status = 'pending'))::float8
      FROM matchmaking_queue
     WHERE event_id = p_event_id;
$$;

-- Put dead rows of an event back into the queue with fresh attempts. Idempotent: a
-- second call finds no dead rows (or coalesces with the live ones).
CREATE FUNCTION mm_redrive(p_event_id bigint, p_profile_ids bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    ids bigint[];
BEGIN
    WITH gone AS (
        DELETE FROM matchmaking_queue q
         WHERE q.event_id = p_event_id AND q.status = 'dead'
           AND (p_profile_ids IS NULL OR q.profile_id = ANY (p_profile_ids))
        RETURNING q.profile_id
    )
    SELECT array_agg(DISTINCT profile_id) INTO ids FROM gone;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN mm_enqueue(p_event_id, ids, 2::smallint, 'redrive');
END
$$;
