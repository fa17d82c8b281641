-- Live spans: each identified user's first and last second in an hour that is still taking
-- events (the open hour, the one just closed), kept by the fold as it goes. A unique-user
-- count whose range ends (or starts) inside such an hour needs the users of that part of
-- it; the stored spans of V7 exist only for settled hours, so without these it reads the
-- part's raw events (thousands per call at 10M events, on every refresh of a dashboard
-- whose end is not now).
--
-- What the insert trigger now appends per pending row: beside the distinct user ids of
-- the hour, each one's first and last second into the hour among the statement's events
-- (parallel arrays). Rows written before this migration (by a transaction that began
-- before it) have NULL seconds; an hour with such a row is read as before.
--
-- What the fold keeps (src/repository/postgres/fold.rs), in the transaction that ORs the
-- pending users into the hour's bitmap: the hour's live spans, merged with the folded
-- rows' seconds (min first, max last), stamped with the bitmap row's version as it leaves
-- that transaction. A row is current while the stamp equals the bitmap's version: a
-- bitmap changed by anything else (an erasure clearing bits, a fold of an older release)
-- outdates it, and the fold then deletes it. Only an hour the fold starts from nothing (no
-- bitmap row yet) gets a live row, so a current row always holds every folded user. A
-- deletion of events in an hour (its negative count deltas) ends the hour's live row too:
-- deleted events leave their users in the bitmap and the spans.
--
-- A count uses a current live row with the hour's pending rows' seconds: the users of
-- [hour start, e) are those whose first second is before e, of [s, hour end) those whose
-- last second is at or after s. The span builder deletes live rows of the hours it
-- settles (V7's spans take over).
--
-- spans: as in user_activity_hour_spans, per user ordered by ordinal, 8 bytes big-endian:
-- ordinal (int4), first second (int2), last second (int2).

ALTER TABLE user_activity_pending
    ADD COLUMN first_seconds SMALLINT[],
    ADD COLUMN last_seconds SMALLINT[];

CREATE TABLE user_activity_live_spans (
    hour_start TIMESTAMPTZ PRIMARY KEY,
    bitmap_version BIGINT NOT NULL,
    spans BYTEA NOT NULL
);
-- Rewritten by every fold into its hour and read whole: compression would cost both.
ALTER TABLE user_activity_live_spans ALTER COLUMN spans SET STORAGE EXTERNAL;

-- The trigger of V5, with each pending user's first and last second into the hour. The
-- second is floor(epoch) - hour start: UTC hours are whole multiples of 3,600 s.
CREATE OR REPLACE FUNCTION analytics_rollup_inserted_events()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH slices AS MATERIALIZED (
        SELECT date_bin('1 hour', timestamp, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS hour_start,
               event_name, user_id, timestamp
        FROM inserted
    ), deltas AS (
        INSERT INTO event_count_deltas (bucket_start, event_name, event_count)
        SELECT hour_start, event_name, count(*)
        FROM slices
        GROUP BY 1, 2
    )
    INSERT INTO user_activity_pending (hour_start, user_ids, first_seconds, last_seconds)
    SELECT hour_start, array_agg(user_id), array_agg(first_second), array_agg(last_second)
    FROM (SELECT hour_start, user_id,
                 floor(date_part('epoch', min(timestamp) - hour_start))::int2 AS first_second,
                 floor(date_part('epoch', max(timestamp) - hour_start))::int2 AS last_second
            FROM slices WHERE user_id <> ''
           GROUP BY hour_start, user_id) pairs
    GROUP BY 1;

    RETURN NULL;
END $$;

-- Retention forgets the live spans of a dropped month with its other rollups.
CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(4104202613);
    DELETE FROM event_counts_hourly WHERE bucket_start < boundary;
    DELETE FROM event_counts_daily WHERE bucket_start < boundary;
    DELETE FROM event_totals_hourly WHERE bucket_start < boundary;
    DELETE FROM event_count_deltas WHERE bucket_start < boundary;
    DELETE FROM user_activity_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_daily WHERE bucket_start < boundary;
    DELETE FROM user_activity_pending WHERE hour_start < boundary;
    DELETE FROM user_activity_hour_spans WHERE hour_start < boundary;
    DELETE FROM user_activity_live_spans WHERE hour_start < boundary;
$$;
