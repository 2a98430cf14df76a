-- The embeddings provider's circuit breaker, one row per provider configuration (model,
-- dimensions, endpoint, key fingerprint). Lambdas are stateless, so whether the provider
-- is usable, since when it fails and when it was last probed live here.
CREATE TABLE provider_breaker (
    config_key    text PRIMARY KEY,
    state         text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open')),
    reason        text,
    -- the first provider fault since the last good answer (NULL while healthy)
    failing_since timestamptz,
    opened_at     timestamptz,
    last_probe_at timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Put leased rows back without counting the attempt: a provider fault is nobody's fault
-- among the users, so it must not bring them nearer the dead-letter queue. Rows are
-- locked in the queue's one lock order first (0007).
CREATE FUNCTION mm_defer(p_queue_ids bigint[], p_errors text[], p_token uuid,
                         p_delay_s double precision)
RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(*) FROM (
        SELECT 1 FROM matchmaking_queue l WHERE l.id = ANY (p_queue_ids)
         ORDER BY l.event_id, l.profile_id, l.id FOR UPDATE
    ) AS locked;

    WITH deferred AS (
    UPDATE matchmaking_queue q
       SET status = 'pending',
           attempts = CASE WHEN q.rerun_requested THEN 0 ELSE greatest(q.attempts - 1, 0) END,
           priority = greatest(q.priority, coalesce(q.rerun_priority, 0)),
           rerun_requested = false, rerun_priority = NULL,
           run_after = now() + make_interval(secs => p_delay_s * (0.5 + random() / 2)),
           lease_token = NULL, lease_expires_at = NULL,
           last_error = left(f.error, 2000), updated_at = now()
      FROM unnest(p_queue_ids, p_errors) AS f(id, error)
     WHERE q.id = f.id AND q.lease_token = p_token AND q.status = 'running'
    RETURNING q.id
    )
    SELECT count(*)::integer FROM deferred;
$$;
