//! Rooms, members and messages on PostgreSQL: the shared queries, and search with tsvector.

use unhidra_core::UserId;
use uuid::Uuid;

use super::PostgresStore;
use crate::StoreError;
use crate::dialect::get;
use crate::rooms::{SearchHit, fts5_query, snippet_html};

crate::queries::rooms::room_queries!(crate::PostgresStore);
use shared::message;

impl PostgresStore {
    pub(crate) async fn search(
        &self,
        user: UserId,
        query: &str,
        room: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if fts5_query(query).is_none() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT m.id, m.room_id, m.sender_id, m.client_msg_id, m.body, m.created_at, \
             ts_headline('simple', m.body, q, 'StartSel=' || chr(57344) || ', StopSel=' || \
             chr(57345) || ', MaxWords=24, MinWords=8, MaxFragments=1, FragmentDelimiter=…') \
             AS snippet, \
             ts_rank(m.body_tsv, q)::float8 AS rank \
             FROM messages m, plainto_tsquery('simple', $1) q, room_members rm \
             WHERE rm.room_id = m.room_id AND rm.user_id = $2 AND m.body_tsv @@ q \
             AND ($3::uuid IS NULL OR m.room_id = $3) \
             ORDER BY rank DESC, m.id DESC LIMIT $4",
        )
        .bind(query)
        .bind(user.0)
        .bind(room)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("message", e))?;
        rows.iter()
            .map(|row| {
                Ok(SearchHit {
                    message: message(row)?,
                    snippet: snippet_html(&get::<_, String>(row, "snippet")?),
                    score: get::<_, f64>(row, "rank")?,
                })
            })
            .collect()
    }
}
