-- Named query blocks used by core.repository. Parameters are always bound (%(name)s).

-- name: event_by_code
SELECT id, code, name, k, exclude_same_company, weight_interests, weight_complement,
       weight_bio, embedder, icebreakers, exposure_correction, hubness_m
  FROM events WHERE code = %(code)s

-- name: event_by_id
SELECT id, code, name, k, exclude_same_company, weight_interests, weight_complement,
       weight_bio, embedder, icebreakers, exposure_correction, hubness_m
  FROM events WHERE id = %(event_id)s

-- name: insert_event
INSERT INTO events (code, name, k, exclude_same_company, weight_interests,
                    weight_complement, weight_bio, embedder, icebreakers,
                    exposure_correction, hubness_m)
VALUES (%(code)s, %(name)s, %(k)s, %(exclude_same_company)s, %(weight_interests)s,
        %(weight_complement)s, %(weight_bio)s, %(embedder)s, %(icebreakers)s,
        %(exposure_correction)s, %(hubness_m)s)
ON CONFLICT (code) DO NOTHING

-- name: drop_profile_staging
DROP TABLE IF EXISTS pg_temp.profile_staging

-- name: create_profile_staging
CREATE TEMP TABLE profile_staging (
    user_id text, name text, company text, title text, bio text,
    interests text[], seeking text[], offering text[]
) ON COMMIT DROP

-- name: copy_profile_staging
COPY profile_staging (user_id, name, company, title, bio, interests, seeking, offering)
FROM STDIN

-- name: upsert_staged_profiles
INSERT INTO profiles AS p (user_id, name, company, title, bio, interests, seeking, offering)
SELECT user_id, name, company, title, bio, interests, seeking, offering FROM profile_staging
ON CONFLICT (user_id) DO UPDATE
   SET name = EXCLUDED.name, company = EXCLUDED.company, title = EXCLUDED.title,
       bio = EXCLUDED.bio, interests = EXCLUDED.interests, seeking = EXCLUDED.seeking,
       offering = EXCLUDED.offering
 WHERE (p.name, p.company, p.title, p.bio, p.interests, p.seeking, p.offering)
       IS DISTINCT FROM
       (EXCLUDED.name, EXCLUDED.company, EXCLUDED.title, EXCLUDED.bio, EXCLUDED.interests,
        EXCLUDED.seeking, EXCLUDED.offering)

-- name: join_staged_profiles
INSERT INTO attendees AS a (event_id, profile_id)
SELECT %(event_id)s, p.id FROM profile_staging s JOIN profiles p USING (user_id)
ON CONFLICT (event_id, profile_id) DO UPDATE SET active = true WHERE NOT a.active

-- name: analyze_matching_tables
ANALYZE profiles, attendees, matchmaking_queue, profile_vectors

-- name: profile_ids_by_user_ids
SELECT user_id, id FROM profiles WHERE user_id = ANY(%(user_ids)s)

-- name: leave_event
UPDATE attendees SET active = false
 WHERE event_id = %(event_id)s AND active
   AND profile_id = (SELECT id FROM profiles WHERE user_id = %(user_id)s)

-- name: insert_dismissal
INSERT INTO dismissals (event_id, profile_id, dismissed_profile_id)
SELECT %(event_id)s, a.id, b.id FROM profiles a, profiles b
 WHERE a.user_id = %(user_id)s AND b.user_id = %(dismissed_user_id)s
ON CONFLICT DO NOTHING

-- name: recover_leases
SELECT queue_id, event_id, profile_id, status, attempts, last_error
  FROM mm_recover_leases(%(max_attempts)s)

-- name: claim_batch
SELECT queue_id, event_id, profile_id, priority, reason, attempts, lease_token
  FROM mm_claim(%(batch_size)s, %(lease_seconds)s, %(event_id)s)

-- name: lock_queue_rows
-- The queue's one lock order (db/migrations/0007_lock_order.sql): a transaction that
-- completes some rows and fails others locks them all in this order first. Returns how
-- long each row has waited since it was enqueued (ms, on the database's clock, so a
-- Lambda's clock skew cannot bend it): the newcomer-latency metric.
SELECT locked.id, locked.waited_ms FROM (
    SELECT q.id, extract(epoch FROM clock_timestamp() - q.enqueued_at)::float8 * 1000
           AS waited_ms
      FROM matchmaking_queue q WHERE q.id = ANY (%(queue_ids)s)
     ORDER BY q.event_id, q.profile_id, q.id FOR UPDATE
) AS locked

-- name: complete_rows
SELECT mm_complete(%(queue_ids)s, %(lease_token)s)

-- name: fail_rows
SELECT queue_id, event_id, profile_id, status, attempts, last_error
  FROM mm_fail(%(queue_ids)s, %(errors)s, %(lease_token)s, %(max_attempts)s,
               %(backoff_base_s)s, %(backoff_max_s)s)

-- name: profiles_to_embed
SELECT p.id, p.user_id, p.name, p.company, p.title, p.bio, p.interests, p.seeking,
       p.offering, v.content_hash
  FROM profiles p
  LEFT JOIN profile_vectors v ON v.profile_id = p.id AND v.embedder = %(embedder)s
 WHERE p.id = ANY(%(profile_ids)s)

-- name: create_vector_staging
CREATE TEMP TABLE vector_staging (
    profile_id bigint, content_hash text, dims integer, vector bytea
) ON COMMIT DROP

-- name: copy_vector_staging
COPY vector_staging (profile_id, content_hash, dims, vector) FROM STDIN

-- name: upsert_staged_vectors
INSERT INTO profile_vectors AS v (profile_id, embedder, content_hash, dims, vector)
SELECT profile_id, %(embedder)s, content_hash, dims, vector FROM vector_staging
ON CONFLICT (profile_id, embedder) DO UPDATE
   SET content_hash = EXCLUDED.content_hash, dims = EXCLUDED.dims, vector = EXCLUDED.vector,
       change_xid = pg_current_xact_id(), updated_at = now()
 WHERE v.content_hash IS DISTINCT FROM EXCLUDED.content_hash

-- name: lock_event
SELECT pg_advisory_xact_lock(mm_event_lock_key(%(event_id)s))

-- name: snapshot_xmin
SELECT pg_snapshot_xmin(pg_current_snapshot())::text

-- name: event_members_all
SELECT a.profile_id, p.user_id, a.active, p.company, p.interests, p.seeking, p.offering,
       v.vector
  FROM attendees a
  JOIN profiles p ON p.id = a.profile_id
  LEFT JOIN profile_vectors v ON v.profile_id = a.profile_id AND v.embedder = %(embedder)s
 WHERE a.event_id = %(event_id)s

-- name: event_members_changed
-- Each branch starts from its change_xid index and checks membership by primary key,
-- so the cost follows the number of changes, not the size of the event.
WITH changed AS (
    SELECT a.profile_id FROM attendees a
     WHERE a.event_id = %(event_id)s AND a.change_xid >= %(since)s::xid8
    UNION
    SELECT p.id FROM profiles p
     WHERE p.change_xid >= %(since)s::xid8
       AND EXISTS (SELECT 1 FROM attendees a
                    WHERE a.event_id = %(event_id)s AND a.profile_id = p.id)
    UNION
    SELECT v.profile_id FROM profile_vectors v
     WHERE v.embedder = %(embedder)s AND v.change_xid >= %(since)s::xid8
       AND EXISTS (SELECT 1 FROM attendees a
                    WHERE a.event_id = %(event_id)s AND a.profile_id = v.profile_id)
)
SELECT a.profile_id, p.user_id, a.active, p.company, p.interests, p.seeking, p.offering,
       v.vector
  FROM changed c
  JOIN attendees a ON a.event_id = %(event_id)s AND a.profile_id = c.profile_id
  JOIN profiles p ON p.id = a.profile_id
  LEFT JOIN profile_vectors v ON v.profile_id = a.profile_id AND v.embedder = %(embedder)s

-- name: dismissals_changed
SELECT profile_id, dismissed_profile_id FROM dismissals
 WHERE event_id = %(event_id)s AND change_xid >= %(since)s::xid8

-- name: lists_version
SELECT lists_version FROM matchmaking_jobs WHERE event_id = %(event_id)s

-- name: event_lists
SELECT profile_id, rank, matched_profile_id, score FROM user_matches
 WHERE event_id = %(event_id)s ORDER BY profile_id, rank

-- name: delete_lists
-- Through the owner's function: no role may delete from user_matches directly (0010).
SELECT mm_delete_lists(%(event_id)s, %(owners)s)

-- name: copy_lists
COPY user_matches (event_id, profile_id, rank, matched_profile_id, score, reasons) FROM STDIN

-- name: bump_lists_version
UPDATE matchmaking_jobs SET lists_version = lists_version + 1
 WHERE event_id = %(event_id)s
RETURNING lists_version

-- name: finish_batch
WITH log AS (
    INSERT INTO matchmaking_batches (event_id, worker_id, started_at, claimed, completed,
                                     failed, lists_written, error)
    VALUES (%(event_id)s, %(worker_id)s, %(started_at)s, %(claimed)s, %(completed)s,
            %(failed)s, %(lists_written)s, %(error)s)
)
UPDATE matchmaking_jobs j
   SET processed_count = processed_count + %(completed)s,
       failed_count = failed_count + %(failed)s,
       dead_count = dead_count + %(dead)s,
       lists_written = lists_written + %(lists_written)s,
       batches = batches + 1,
       last_batch_at = now(),
       last_error = coalesce(%(error)s, j.last_error),
       last_error_at = CASE WHEN %(error)s::text IS NULL THEN j.last_error_at ELSE now() END,
       status = CASE
           WHEN j.status = 'paused' THEN 'paused'
           WHEN EXISTS (SELECT 1 FROM matchmaking_queue q
                         WHERE q.event_id = j.event_id AND q.status IN ('pending', 'running'))
           THEN 'running'
           ELSE 'done' END,
       finished_at = CASE
           WHEN EXISTS (SELECT 1 FROM matchmaking_queue q
                         WHERE q.event_id = j.event_id AND q.status IN ('pending', 'running'))
           THEN NULL ELSE now() END,
       updated_at = now()
 WHERE j.event_id = %(event_id)s

-- name: export_lists
SELECT o.user_id, m.rank, t.user_id AS matched_user_id, m.score, m.reasons
  FROM attendees a
  JOIN profiles o ON o.id = a.profile_id
  LEFT JOIN user_matches m ON m.event_id = a.event_id AND m.profile_id = a.profile_id
  LEFT JOIN profiles t ON t.id = m.matched_profile_id
 WHERE a.event_id = %(event_id)s AND a.active
 ORDER BY o.user_id COLLATE "C", m.rank

-- name: job_status
SELECT status, processed_count, failed_count, dead_count, lists_written, batches,
       lists_version, started_at, finished_at, last_batch_at, last_error, last_error_at
  FROM matchmaking_jobs WHERE event_id = %(event_id)s

-- name: queue_stats
SELECT pending_p0, pending_p1, pending_p2, pending_p3, ready, running, dead,
       oldest_pending_age_s
  FROM mm_queue_stats(%(event_id)s)

-- name: attendee_counts
SELECT count(*) FILTER (WHERE a.active) AS active,
       count(*) FILTER (WHERE NOT a.active) AS left_event,
       count(*) FILTER (WHERE a.active AND EXISTS (
           SELECT 1 FROM user_matches m
            WHERE m.event_id = a.event_id AND m.profile_id = a.profile_id)) AS with_matches
  FROM attendees a WHERE a.event_id = %(event_id)s

-- name: dead_rows
SELECT q.id, p.user_id, q.attempts, q.last_error, q.dead_at
  FROM matchmaking_queue q JOIN profiles p ON p.id = q.profile_id
 WHERE q.event_id = %(event_id)s AND q.status = 'dead'
 ORDER BY q.dead_at, q.id

-- name: oracle_members
SELECT a.profile_id, p.user_id, p.company, p.title, p.bio, p.interests, p.seeking,
       p.offering, v.vector, v.content_hash
  FROM attendees a
  JOIN profiles p ON p.id = a.profile_id
  LEFT JOIN profile_vectors v ON v.profile_id = a.profile_id AND v.embedder = %(embedder)s
 WHERE a.event_id = %(event_id)s AND a.active

-- name: oracle_dismissals
SELECT profile_id, dismissed_profile_id FROM dismissals WHERE event_id = %(event_id)s

-- name: oracle_lists
SELECT m.profile_id, m.rank, m.matched_profile_id, m.score FROM user_matches m
 WHERE m.event_id = %(event_id)s ORDER BY m.profile_id, m.rank

-- name: live_queue_count
SELECT count(*) FROM matchmaking_queue WHERE status IN ('pending', 'running')

-- name: delete_event
DELETE FROM events WHERE code = %(code)s

-- name: delete_profiles_with_prefix
DELETE FROM profiles WHERE starts_with(user_id, %(prefix)s)

-- name: attendee_state
SELECT p.id AS profile_id,
       (p.name, p.company, p.title, p.bio, p.interests, p.seeking, p.offering)
         IS NOT DISTINCT FROM
       (%(name)s::text, %(company)s::text, %(title)s::text, %(bio)s::text,
        %(interests)s::text[], %(seeking)s::text[], %(offering)s::text[]) AS same_profile,
       coalesce(a.active, false) AS active
  FROM profiles p
  LEFT JOIN attendees a ON a.profile_id = p.id AND a.event_id = %(event_id)s
 WHERE p.user_id = %(user_id)s

-- name: attendee_matches
-- An attendee's list; dismissed people are hidden at once, before the re-match lands.
SELECT t.user_id, m.rank, m.score, m.reasons, i.text AS icebreaker
  FROM attendees a
  JOIN profiles o ON o.id = a.profile_id
  LEFT JOIN user_matches m ON m.event_id = a.event_id AND m.profile_id = a.profile_id
       AND NOT EXISTS (SELECT 1 FROM dismissals d
                        WHERE d.event_id = m.event_id
                          AND ((d.profile_id = m.profile_id
                                AND d.dismissed_profile_id = m.matched_profile_id)
                            OR (d.profile_id = m.matched_profile_id
                                AND d.dismissed_profile_id = m.profile_id)))
  LEFT JOIN profiles t ON t.id = m.matched_profile_id
  LEFT JOIN icebreakers i ON i.event_id = m.event_id AND i.profile_id = m.profile_id
       AND i.matched_profile_id = m.matched_profile_id
 WHERE a.event_id = %(event_id)s AND a.active AND o.user_id = %(user_id)s
 ORDER BY m.rank

-- name: active_attendee_count
SELECT count(*) FROM attendees a JOIN profiles p ON p.id = a.profile_id
 WHERE a.event_id = %(event_id)s AND a.active AND p.user_id = ANY(%(user_ids)s)

-- name: event_size
SELECT count(*) FROM attendees WHERE event_id = %(event_id)s AND active

-- name: enqueue_users
SELECT mm_enqueue(%(event_id)s,
    ARRAY(SELECT a.profile_id FROM attendees a JOIN profiles p ON p.id = a.profile_id
           WHERE a.event_id = %(event_id)s AND a.active AND p.user_id = ANY(%(user_ids)s)),
    %(priority)s::smallint, %(reason)s)

-- name: enqueue_active
SELECT mm_enqueue(%(event_id)s,
    ARRAY(SELECT a.profile_id FROM attendees a
           WHERE a.event_id = %(event_id)s AND a.active
             AND NOT (%(only_unmatched)s AND EXISTS (
                 SELECT 1 FROM user_matches m
                  WHERE m.event_id = a.event_id AND m.profile_id = a.profile_id))),
    %(priority)s::smallint, %(reason)s)

-- name: throughput
SELECT coalesce(sum(completed) FILTER (WHERE finished_at > now() - interval '5 minutes'), 0)
           / 5.0 AS per_min_5m,
       coalesce(sum(completed), 0) / 60.0 AS per_min_60m
  FROM matchmaking_batches
 WHERE event_id = %(event_id)s AND finished_at > now() - interval '60 minutes'

-- name: pause_job
INSERT INTO matchmaking_jobs AS j (event_id, status) VALUES (%(event_id)s, 'paused')
ON CONFLICT (event_id) DO UPDATE SET status = 'paused', updated_at = now()

-- name: resume_job
UPDATE matchmaking_jobs j
   SET status = CASE WHEN EXISTS (SELECT 1 FROM matchmaking_queue q
                                   WHERE q.event_id = j.event_id
                                     AND q.status IN ('pending', 'running'))
                     THEN 'running' ELSE 'done' END,
       updated_at = now()
 WHERE j.event_id = %(event_id)s AND j.status = 'paused'

-- name: redrive_dead
SELECT mm_redrive(%(event_id)s, %(profile_ids)s)

-- name: describe_queue_outcomes
SELECT e.id AS event_id, e.code AS event_code, p.id AS profile_id, p.user_id
  FROM unnest(%(event_ids)s::bigint[], %(profile_ids)s::bigint[]) AS o(event_id, profile_id)
  JOIN events e ON e.id = o.event_id
  JOIN profiles p ON p.id = o.profile_id

-- name: pending_by_priority
-- Pending rows of the whole queue per priority (the QueuePendingP0..P3 metrics).
SELECT count(*) FILTER (WHERE priority = 0), count(*) FILTER (WHERE priority = 1),
       count(*) FILTER (WHERE priority = 2), count(*) FILTER (WHERE priority = 3)
  FROM matchmaking_queue WHERE status = 'pending'

-- name: oldest_pending_age
SELECT coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)::float8
  FROM matchmaking_queue WHERE status = 'pending'

-- name: job_is_paused
SELECT EXISTS (SELECT 1 FROM matchmaking_jobs
                WHERE event_id = %(event_id)s AND status = 'paused')

-- name: swap_embedder_key
-- Returns the previous key (NULL the first time) and records the current one.
UPDATE matchmaking_jobs j SET embedder_key = %(embedder_key)s
  FROM (SELECT event_id, embedder_key FROM matchmaking_jobs
         WHERE event_id = %(event_id)s FOR UPDATE) old
 WHERE j.event_id = old.event_id AND j.embedder_key IS DISTINCT FROM %(embedder_key)s
RETURNING old.embedder_key

-- name: update_event_settings
UPDATE events
   SET k = %(k)s, exclude_same_company = %(exclude_same_company)s,
       weight_interests = %(weight_interests)s, weight_complement = %(weight_complement)s,
       weight_bio = %(weight_bio)s, embedder = %(embedder)s, icebreakers = %(icebreakers)s,
       exposure_correction = %(exposure_correction)s, hubness_m = %(hubness_m)s,
       updated_at = now()
 WHERE id = %(event_id)s

-- name: icebreaker_pairs
-- Both profiles of each (owner, matched) pair and the hash of the stored sentence, if any.
SELECT o.id AS owner_id, t.id AS matched_id, o.user_id AS owner_user_id,
       o.title AS owner_title, o.bio AS owner_bio, o.interests AS owner_interests,
       o.seeking AS owner_seeking, o.offering AS owner_offering,
       t.user_id AS matched_user_id, t.title AS matched_title, t.bio AS matched_bio,
       t.interests AS matched_interests, t.seeking AS matched_seeking,
       t.offering AS matched_offering, i.pair_hash
  FROM unnest(%(owners)s::bigint[], %(matched)s::bigint[]) AS pair(owner_id, matched_id)
  JOIN profiles o ON o.id = pair.owner_id
  JOIN profiles t ON t.id = pair.matched_id
  LEFT JOIN icebreakers i ON i.event_id = %(event_id)s AND i.profile_id = o.id
       AND i.matched_profile_id = t.id

-- name: upsert_icebreaker
INSERT INTO icebreakers AS i (event_id, profile_id, matched_profile_id, pair_hash, text)
VALUES (%(event_id)s, %(profile_id)s, %(matched_profile_id)s, %(pair_hash)s, %(text)s)
ON CONFLICT (event_id, profile_id, matched_profile_id) DO UPDATE
   SET pair_hash = EXCLUDED.pair_hash, text = EXCLUDED.text, created_at = now()

-- name: repeatable_read
-- First statement of a read that must see one snapshot throughout (status).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: status_queue_now
-- The event's queue as it is now (admin status, CLI status). Waiting for a retry: a
-- pending row that has failed before (attempts > 0), whether or not its backoff is over,
-- and a running row whose lease ran out (its worker vanished; the next run recovers it).
-- A dead row counts only while the user has no live row (an edit or redrive re-queued them).
SELECT count(*) FILTER (WHERE q.status = 'pending' AND q.attempts = 0 AND q.priority = 0)
           AS pending_p0,
       count(*) FILTER (WHERE q.status = 'pending' AND q.attempts = 0 AND q.priority = 1)
           AS pending_p1,
       count(*) FILTER (WHERE q.status = 'pending' AND q.attempts = 0 AND q.priority = 2)
           AS pending_p2,
       count(*) FILTER (WHERE q.status = 'pending' AND q.attempts = 0 AND q.priority = 3)
           AS pending_p3,
       count(*) FILTER (WHERE q.status = 'running' AND q.lease_expires_at >= now()) AS running,
       count(*) FILTER (WHERE r.retry_at IS NOT NULL) AS waiting_retry,
       min(r.retry_at) AS next_retry_at,
       max(r.retry_at) AS last_retry_at,
       count(DISTINCT q.profile_id) FILTER (
           WHERE q.status = 'dead' AND NOT EXISTS (
               SELECT 1 FROM matchmaking_queue l
                WHERE l.event_id = q.event_id AND l.profile_id = q.profile_id
                  AND l.status IN ('pending', 'running'))) AS dead,
       extract(epoch FROM now() - min(q.enqueued_at) FILTER (WHERE q.status = 'pending'))::float8
           AS oldest_pending_age_s
  FROM matchmaking_queue q
  CROSS JOIN LATERAL (
      SELECT CASE WHEN q.status = 'pending' AND q.attempts > 0 THEN q.run_after
                  WHEN q.status = 'running' AND q.lease_expires_at < now()
                  THEN q.lease_expires_at END AS retry_at
  ) r
 WHERE q.event_id = %(event_id)s

-- name: status_job
-- Lifetime totals and the pause flag of the event's job row (absent before any work).
SELECT status = 'paused' AS paused, processed_count, failed_count, dead_count, batches,
       lists_written, embedder_key, last_batch_at, last_error, last_error_at
  FROM matchmaking_jobs WHERE event_id = %(event_id)s

-- name: status_coverage
-- Per active attendee: list entries stored, and how many they could have, min(k, others
-- allowed): active others minus colleagues (same company, case-insensitive, when the
-- event excludes them) minus the active others a dismissal separates them from.
WITH s AS (
    SELECT k, exclude_same_company FROM events WHERE id = %(event_id)s
),
active AS (
    SELECT a.profile_id, nullif(lower(btrim(p.company)), '') AS company
      FROM attendees a JOIN profiles p ON p.id = a.profile_id
     WHERE a.event_id = %(event_id)s AND a.active
),
colleagues AS (
    SELECT company, count(*) - 1 AS others FROM active
     WHERE company IS NOT NULL GROUP BY company
),
dismissed AS (
    SELECT pair.me, count(DISTINCT pair.other) AS others
      FROM (SELECT d.profile_id AS me, d.dismissed_profile_id AS other
              FROM dismissals d WHERE d.event_id = %(event_id)s
            UNION ALL
            SELECT d.dismissed_profile_id, d.profile_id
              FROM dismissals d WHERE d.event_id = %(event_id)s) pair
      JOIN active m ON m.profile_id = pair.me
      JOIN active o ON o.profile_id = pair.other
      CROSS JOIN s
     WHERE NOT (s.exclude_same_company AND m.company IS NOT NULL
                AND m.company = o.company)  -- already excluded as a colleague
     GROUP BY pair.me
),
listed AS (
    SELECT m.profile_id, count(*) AS entries FROM user_matches m
     WHERE m.event_id = %(event_id)s GROUP BY m.profile_id
),
per_attendee AS (
    SELECT coalesce(l.entries, 0) AS entries,
           least(s.k, (SELECT count(*) FROM active) - 1
                      - CASE WHEN s.exclude_same_company THEN coalesce(c.others, 0) ELSE 0 END
                      - coalesce(d.others, 0)) AS possible
      FROM active a CROSS JOIN s
      LEFT JOIN colleagues c ON c.company = a.company
      LEFT JOIN dismissed d ON d.me = a.profile_id
      LEFT JOIN listed l ON l.profile_id = a.profile_id
)
SELECT (SELECT k FROM s) AS k,
       count(*) AS active,
       count(*) FILTER (WHERE p.entries >= (SELECT k FROM s)) AS full_lists,
       count(*) FILTER (WHERE p.entries < (SELECT k FROM s) AND p.entries >= p.possible)
           AS short_lists_few_candidates,
       count(*) FILTER (WHERE p.entries < p.possible) AS missing_matches,
       count(*) FILTER (WHERE p.entries = 0) AS without_list
  FROM per_attendee p

-- name: status_exposure
-- How often each active attendee appears on others' lists: the most, the mean and the
-- Gini coefficient over all active attendees (0 = everyone equally listed; NULL when
-- nobody is listed). Gini from the ascending order: 2*sum(i*x_i)/(n*sum x) - (n+1)/n.
WITH appearances AS (
    SELECT a.profile_id, coalesce(m.times, 0) AS times
      FROM attendees a
      LEFT JOIN (SELECT matched_profile_id, count(*) AS times FROM user_matches
                  WHERE event_id = %(event_id)s GROUP BY matched_profile_id) m
        ON m.matched_profile_id = a.profile_id
     WHERE a.event_id = %(event_id)s AND a.active
),
ranked AS (
    SELECT times, row_number() OVER (ORDER BY times) AS i FROM appearances
)
SELECT coalesce(max(times), 0) AS max_appearances,
       avg(times)::float8 AS mean_appearances,
       CASE WHEN sum(times) > 0
            THEN (2.0 * sum(i * times) / (count(*) * sum(times))
                  - (count(*) + 1.0) / count(*))::float8 END AS gini
  FROM ranked

-- name: status_queue_overview
-- Every event's queue after a local run (matchmaker run): what is still pending and
-- where, who waits for a retry (as in status_queue_now) and until when, who is dead.
SELECT e.code AS event,
       coalesce(j.status = 'paused', false) AS paused,
       count(*) FILTER (WHERE q.status = 'pending' AND q.attempts = 0) AS pending,
       count(*) FILTER (WHERE q.status = 'running' AND q.lease_expires_at >= now()) AS running,
       count(*) FILTER (WHERE r.retry_at IS NOT NULL) AS waiting_retry,
       min(r.retry_at) AS next_retry_at,
       max(r.retry_at) AS last_retry_at,
       count(DISTINCT q.profile_id) FILTER (
           WHERE q.status = 'dead' AND NOT EXISTS (
               SELECT 1 FROM matchmaking_queue l
                WHERE l.event_id = q.event_id AND l.profile_id = q.profile_id
                  AND l.status IN ('pending', 'running'))) AS dead
  FROM matchmaking_queue q
  CROSS JOIN LATERAL (
      SELECT CASE WHEN q.status = 'pending' AND q.attempts > 0 THEN q.run_after
                  WHEN q.status = 'running' AND q.lease_expires_at < now()
                  THEN q.lease_expires_at END AS retry_at
  ) r
  JOIN events e ON e.id = q.event_id
  LEFT JOIN matchmaking_jobs j ON j.event_id = q.event_id
 GROUP BY e.code, j.status
 ORDER BY e.code

-- name: defer_rows
-- Put leased rows back after a provider fault without counting the attempt (0009).
SELECT mm_defer(%(queue_ids)s, %(errors)s, %(lease_token)s, %(delay_s)s)

-- name: breaker_read
-- The provider configuration's circuit breaker, as of now (no row: closed, never failed).
SELECT state, reason, failing_since, opened_at, last_probe_at,
       state = 'open' AND (last_probe_at IS NULL
           OR last_probe_at <= now() - make_interval(secs => %(probe_interval_s)s))
           AS probe_due
  FROM provider_breaker WHERE config_key = %(config_key)s

-- name: breaker_fault
-- Record a provider fault: a permanent one opens the breaker at once, transient ones once
-- they have lasted window_s since the first fault after the last good answer. Returns the
-- state before and after, for the transition log.
WITH old AS (
    SELECT state FROM provider_breaker WHERE config_key = %(config_key)s FOR UPDATE
),
upserted AS (
INSERT INTO provider_breaker AS b (config_key, state, reason, failing_since, opened_at,
                                   last_probe_at, updated_at)
VALUES (%(config_key)s,
        CASE WHEN %(permanent)s OR %(window_s)s <= 0 THEN 'open' ELSE 'closed' END,
        %(reason)s, now(),
        CASE WHEN %(permanent)s OR %(window_s)s <= 0 THEN now() END,
        CASE WHEN %(permanent)s OR %(window_s)s <= 0 THEN now() END, now())
ON CONFLICT (config_key) DO UPDATE
   SET failing_since = coalesce(b.failing_since, now()),
       state = CASE WHEN b.state = 'open' OR %(permanent)s
                      OR coalesce(b.failing_since, now())
                         <= now() - make_interval(secs => %(window_s)s)
                    THEN 'open' ELSE 'closed' END,
       opened_at = CASE WHEN b.state = 'open' THEN b.opened_at
                        WHEN %(permanent)s OR coalesce(b.failing_since, now())
                             <= now() - make_interval(secs => %(window_s)s)
                        THEN now() END,
       last_probe_at = CASE WHEN b.state = 'open' THEN b.last_probe_at
                            WHEN %(permanent)s OR coalesce(b.failing_since, now())
                                 <= now() - make_interval(secs => %(window_s)s)
                            THEN now() END,
       reason = %(reason)s, updated_at = now()
RETURNING b.state, b.opened_at
)
SELECT coalesce((SELECT state FROM old), 'closed') AS was, u.state, u.opened_at
  FROM upserted u

-- name: breaker_success
-- A good answer: close the breaker and forget the failures. Returns the previous state
-- when something changed (nothing while it was already closed and healthy).
UPDATE provider_breaker b
   SET state = 'closed', reason = NULL, failing_since = NULL, opened_at = NULL,
       updated_at = now()
  FROM (SELECT config_key, state FROM provider_breaker
         WHERE config_key = %(config_key)s FOR UPDATE) old
 WHERE b.config_key = old.config_key AND (b.state = 'open' OR b.failing_since IS NOT NULL)
RETURNING old.state AS was

-- name: breaker_claim_probe
-- One worker at a time probes an open breaker once per probe interval (half-open).
UPDATE provider_breaker SET last_probe_at = now(), updated_at = now()
 WHERE config_key = %(config_key)s AND state = 'open'
   AND (last_probe_at IS NULL
        OR last_probe_at <= now() - make_interval(secs => %(probe_interval_s)s))
RETURNING config_key

-- name: events_to_switch_back
-- Events that ask for OpenAI whose stored vectors come from another embedder (a
-- fallback) and that have nothing queued: they are queued whole to switch back.
SELECT j.event_id
  FROM matchmaking_jobs j JOIN events e ON e.id = j.event_id
 WHERE e.embedder = 'openai' AND j.embedder_key IS NOT NULL
   AND j.embedder_key <> %(embedder_key)s AND j.status <> 'paused'
   AND NOT EXISTS (SELECT 1 FROM matchmaking_queue q
                    WHERE q.event_id = j.event_id AND q.status IN ('pending', 'running'))

-- name: icebreakers_missing
-- Catch-up: list entries of events that want icebreakers and have none (never asked,
-- or the call failed), oldest list entry first.
SELECT m.event_id, m.profile_id AS owner_id, m.matched_profile_id AS matched_id
  FROM user_matches m JOIN events e ON e.id = m.event_id
 WHERE e.icebreakers
   AND NOT EXISTS (SELECT 1 FROM icebreakers i
                    WHERE i.event_id = m.event_id AND i.profile_id = m.profile_id
                      AND i.matched_profile_id = m.matched_profile_id)
 ORDER BY m.updated_at, m.event_id, m.profile_id, m.matched_profile_id
 LIMIT %(limit)s

-- name: status_icebreakers
-- Icebreaker coverage of the event's current lists.
SELECT count(*) AS pairs, count(i.profile_id) AS with_icebreaker
  FROM user_matches m
  LEFT JOIN icebreakers i ON i.event_id = m.event_id AND i.profile_id = m.profile_id
       AND i.matched_profile_id = m.matched_profile_id
 WHERE m.event_id = %(event_id)s

-- name: hold_presence
-- A lingering matchmaker run holds (or renews) its lease: while it is valid the API sends
-- no wake, since this run will claim what the API queued (db/migrations/0011). True when
-- a run that came before this one is present too.
SELECT mm_hold_presence(%(run_id)s, %(worker_id)s, %(lease_s)s)

-- name: release_presence
-- The run leaves; once this commits the API wakes again. The run then looks once more.
SELECT mm_release_presence(%(run_id)s)

-- name: matchmaker_present
-- Is any run's lease valid? Read by the API after the commit that queued work.
SELECT EXISTS (SELECT 1 FROM matchmaker_presence WHERE lease_until > clock_timestamp())

-- name: claimable_event_code
-- The code of an event with a row mm_claim would hand out now (pending, due, event not
-- paused), or nothing: the leaving run's last look, without claiming.
SELECT e.code
  FROM matchmaking_queue q
  JOIN events e ON e.id = q.event_id
  LEFT JOIN matchmaking_jobs j ON j.event_id = q.event_id
 WHERE q.status = 'pending' AND q.run_after <= now()
   AND coalesce(j.status, 'running') <> 'paused'
 LIMIT 1
