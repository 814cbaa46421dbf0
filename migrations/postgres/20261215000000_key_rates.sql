-- Requests a minute per API key (issue 27), counted in the database so that every instance
-- shares one count: `rate_limits` holds, per limited thing (`key:<id>`), the theoretical
-- arrival time of the next request in milliseconds (GCRA: each request moves it on by
-- 60,000 / rpm; a request is admitted while it stays within a minute of now). One upsert
-- a request checks and counts it.

ALTER TABLE api_keys ADD COLUMN rpm BIGINT;

CREATE TABLE rate_limits (
    name   TEXT   PRIMARY KEY,
    tat_ms BIGINT NOT NULL
);
