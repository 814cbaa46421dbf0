-- Operators can disable an account (`tokenchat user disable NAME`): its login, tokens and
-- keys are refused while `disabled_at` is set; its balance and history are kept.
ALTER TABLE users ADD COLUMN disabled_at BIGINT;
