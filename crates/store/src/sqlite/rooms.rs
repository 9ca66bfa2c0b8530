//! Rooms, members and messages on SQLite: the shared queries, and search with FTS5.

use unhidra_core::UserId;
use uuid::Uuid;

use super::SqliteStore;
use crate::StoreError;
use crate::dialect::get;
use crate::rooms::{SearchHit, fts5_query, snippet_html};

crate::queries::rooms::room_queries!(crate::SqliteStore);
use shared::message;

impl SqliteStore {
    pub(crate) async fn search(
        &self,
        user: UserId,
        query: &str,
        room: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<SearchHit>, StoreError> {
        let Some(fts) = fts5_query(query) else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(
            "SELECT m.id, m.room_id, m.sender_id, m.client_msg_id, m.body, m.created_at, \
             snippet(messages_fts, 0, char(57344), char(57345), '…', 12) AS snippet, \
             bm25(messages_fts) AS rank \
             FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid \
             JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = $2 \
             WHERE messages_fts MATCH $1 AND ($3 IS NULL OR m.room_id = $3) \
             ORDER BY rank LIMIT $4",
        )
        .bind(fts)
        .bind(user.to_string())
        .bind(room.map(|r| r.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::from_sqlx("message", e))?;
        rows.iter()
            .map(|row| {
                Ok(SearchHit {
                    message: message(row)?,
                    snippet: snippet_html(&get::<_, String>(row, "snippet")?),
                    // bm25 is lower for better matches.
                    score: -get::<_, f64>(row, "rank")?,
                })
            })
            .collect()
    }
}
