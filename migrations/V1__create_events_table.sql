-- Events: one row per tracked event, range-partitioned by `timestamp` with one partition
-- per UTC month (events_pYYYYMM).
--
-- Monthly, not daily: the dashboard ranges (7 to 90 days) then touch 1 to 4 partitions
-- instead of 7 to 90, which keeps planning cheap; retention drops whole partitions (see
-- analytics_drop_event_partitions_before in V4).

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

SELECT analytics_ensure_event_partitions(now() - interval '3 months', now() + interval '3 months');
