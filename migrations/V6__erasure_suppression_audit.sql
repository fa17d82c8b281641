-- Erasure and access requests (AnalyticsAdminService): the suppression list, durable
-- erasure requests, the audit trail of administrative calls, and what keeps the rollups
-- exact when events are deleted.
--
-- A user is named here only by its keyed hash (HMAC-SHA256 of the user id under
-- SUPPRESSION_KEY_FILE's key), never in clear, except in erasure_requests.user_id while
-- the erasure runs (the worker needs it to find the rows); completion sets it to NULL.

-- Users whose later events and identities are not stored (DeleteUser with suppress).
-- Ingestion checks it inside the inserting statement (src/repository/postgres/events.rs).
CREATE TABLE suppressed_users (
    subject_hash BYTEA PRIMARY KEY,
    suppressed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per DeleteUser request; the worker of any replica erases in bounded batches
-- and completes it (src/service/erasure.rs).
CREATE TABLE erasure_requests (
    id UUID PRIMARY KEY,
    subject_hash BYTEA NOT NULL,
    -- In clear only while running; NULL once completed.
    user_id VARCHAR(255),
    suppress BOOLEAN NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'completed')),
    events_deleted BIGINT NOT NULL DEFAULT 0,
    insert_ids_deleted BIGINT NOT NULL DEFAULT 0,
    identity_deleted BOOLEAN NOT NULL DEFAULT false,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ,
    -- The transaction that recorded the request (and the suppression): the final pass
    -- waits until no snapshot older than it is in use, so no write that missed the
    -- suppression can land after the erasure.
    recorded_xid XID8 NOT NULL DEFAULT pg_current_xact_id(),
    -- The replica working on it holds it until then, renewing it every batch; a crashed
    -- replica's request is taken over when it lapses.
    leased_until TIMESTAMPTZ,
    CHECK ((state = 'running') = (user_id IS NOT NULL))
);
-- At most one running request per user: a second DeleteUser joins the first.
CREATE UNIQUE INDEX erasure_requests_one_running ON erasure_requests (subject_hash) WHERE state = 'running';

-- The UTC hours in which a running erasure deleted events: where the user's bit must be
-- cleared from the hourly and daily bitmaps when it completes.
CREATE TABLE erasure_hours (
    request_id UUID NOT NULL REFERENCES erasure_requests (id) ON DELETE CASCADE,
    hour_start TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (request_id, hour_start)
);

-- Counts completed erasures. Every cached count answer carries the value it was
-- computed under and is used only while it is unchanged, so an erasure invalidates
-- every cached answer, the immutable ones included.
CREATE TABLE erasure_generation (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    generation BIGINT NOT NULL
);
INSERT INTO erasure_generation (generation) VALUES (0);

-- The audit trail of administrative calls (who, what, outcome, counts, when), naming
-- the user by its keyed hash.
CREATE TABLE admin_audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    rpc TEXT NOT NULL,
    caller TEXT NOT NULL,
    subject_hash BYTEA,
    request_id UUID,
    outcome TEXT NOT NULL,
    details JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX idx_admin_audit_at ON admin_audit (at);

-- The stamp of the count cache must change with every fold into its hours. Counts
-- only grew before deletions existed, so their sum served; with deletions a fold can
-- leave the sum unchanged (minus 5 of one name, plus 5 of another), so each total row
-- now carries a version the fold bumps, and the stamp sums versions.
ALTER TABLE event_totals_hourly ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- Deleted events leave the rollups: per deleting statement, minus the events per (UTC
-- hour, name), appended like the insert trigger's counts and folded the same way (the
-- fold drops a rollup row its deltas bring to zero). Whatever code deletes events is
-- counted; dropping a partition (retention) is not a DELETE and forgets the month's
-- rollups itself. The users' bits in the bitmaps are the erasure's work.
CREATE OR REPLACE FUNCTION analytics_rollup_deleted_events()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_count_deltas (bucket_start, event_name, event_count)
    SELECT date_bin('1 hour', timestamp, TIMESTAMPTZ '2000-01-01 00:00:00+00'), event_name, -count(*)
    FROM deleted
    GROUP BY 1, 2;
    RETURN NULL;
END $$;

CREATE TRIGGER events_rollup_after_delete
AFTER DELETE ON events
REFERENCING OLD TABLE AS deleted
FOR EACH STATEMENT
EXECUTE FUNCTION analytics_rollup_deleted_events();
