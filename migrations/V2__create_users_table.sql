-- User identities: one row per identified user (IdentifyUser), with the properties it
-- last sent.
CREATE TABLE user_identities (
    user_id VARCHAR(255) PRIMARY KEY,
    properties JSONB,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX idx_user_identities_properties ON user_identities USING GIN (properties);
