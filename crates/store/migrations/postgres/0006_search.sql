-- Full-text search over messages: a generated tsvector with a GIN index. The `simple`
-- configuration (no stemming) matches what SQLite's unicode61 tokenizer finds.
ALTER TABLE messages
    ADD COLUMN body_tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED;
CREATE INDEX messages_search ON messages USING GIN (body_tsv);
