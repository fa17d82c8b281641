-- Issue 4: `events` becomes range-partitioned by `timestamp`, one partition per UTC month
-- (events_pYYYYMM). Rows of the unpartitioned table move over in this same transaction,
-- so the migration either keeps every row or changes nothing.
--
-- Monthly, not daily: the dashboard ranges (7 to 90 days) then touch 1 to 4 partitions
-- instead of 7 to 90, which keeps planning cheap; retention is still whole partitions.

-- Partitions are created ahead of time by this function (called here, by `migrate` and
-- by a periodic task in `serve`). It is idempotent and serialised with an advisory lock,
-- so several pods may call it at once.
CREATE OR REPLACE FUNCTION analytics_ensure_event_partitions(from_time timestamptz, to_time timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', from_time AT TIME ZONE 'UTC');
    last_month timestamp := date_trunc('month', to_time AT TIME ZONE 'UTC');
    partition_name text;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('analytics_event_partitions'));
    WHILE month_start <= last_month LOOP
        partition_name := 'events_p' || to_char(month_start, 'YYYYMM');
        IF to_regclass(partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC'
            );
            created := created + 1;
        END IF;
        month_start := month_start + interval '1 month';
    END LOOP;
    RETURN created;
END $$;

ALTER TABLE events RENAME TO events_unpartitioned;
DROP INDEX IF EXISTS idx_events_user_id;
DROP INDEX IF EXISTS idx_events_event_name;
DROP INDEX IF EXISTS idx_events_timestamp;
DROP INDEX IF EXISTS idx_events_properties;

CREATE TABLE events (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    event_name VARCHAR(255) NOT NULL,
    user_id VARCHAR(255),
    properties JSONB,
    timestamp TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    -- A primary key of a partitioned table must include the partition key.
    PRIMARY KEY (id, timestamp)
) PARTITION BY RANGE (timestamp);

CREATE INDEX idx_events_user_id ON events (user_id);
CREATE INDEX idx_events_event_name_timestamp ON events (event_name, timestamp);
CREATE INDEX idx_events_timestamp ON events (timestamp);
CREATE INDEX idx_events_properties ON events USING GIN (properties);

SELECT analytics_ensure_event_partitions(
    least((SELECT min(timestamp) FROM events_unpartitioned), now() - interval '3 months'),
    greatest((SELECT max(timestamp) FROM events_unpartitioned), now() + interval '3 months')
);

INSERT INTO events (id, event_name, user_id, properties, timestamp, created_at)
SELECT id, event_name, user_id, properties, timestamp, created_at FROM events_unpartitioned;

DROP TABLE events_unpartitioned;

-- Retention: drops every partition that ends at or before `cutoff`; returns their names.
-- Rollup rows of the dropped months go with them (see V11).
CREATE OR REPLACE FUNCTION analytics_drop_event_partitions_before(cutoff timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    partition record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('analytics_event_partitions'));
    FOR partition IN
        SELECT child.relname::text AS name,
               (to_timestamp(substring(child.relname FROM 9), 'YYYYMM')::timestamp AT TIME ZONE 'UTC')
                   AS month_start
        FROM pg_inherits
        JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE parent.relname = 'events' AND child.relname ~ '^events_p[0-9]{6}$'
        ORDER BY child.relname
    LOOP
        IF partition.month_start + interval '1 month' <= cutoff THEN
            EXECUTE format('DROP TABLE %I', partition.name);
            PERFORM analytics_forget_rollups_before(partition.month_start + interval '1 month');
            RETURN NEXT partition.name;
        END IF;
    END LOOP;
END $$;

-- Replaced by V11 once the rollup tables exist.
CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$ SELECT NULL::void $$;
