-- User identities: one row per identified user (the design's schema).
CREATE TABLE IF NOT EXISTS user_identities (
    user_id VARCHAR(255) PRIMARY KEY,
    properties JSONB,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_user_identities_properties ON user_identities USING GIN(properties);
