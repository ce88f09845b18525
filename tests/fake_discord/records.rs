//! Public records: what the fake stores and tests look at (calls, messages,
//! interaction handles, gateway statistics).

use super::*;

/// A file part of a multipart request.
#[derive(Clone, Debug)]
pub struct RecordedFile {
    /// Form field name, e.g. `files[0]`.
    pub field: String,
    pub filename: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// One REST call as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    /// Position in [`FakeDiscord::calls`].
    pub index: usize,
    pub method: String,
    /// Path without the `/api/v10` prefix, e.g. `/channels/20/messages`.
    pub path: String,
    /// Raw query string without `?` (serenity sends `&limit=50`).
    pub query: String,
    /// JSON body (`payload_json` for multipart), `Null` when empty.
    pub body: Value,
    /// File parts of a multipart body.
    pub files: Vec<RecordedFile>,
    /// Status the fake answered with.
    pub status: u16,
    /// True when the answer came from [`FakeDiscord::fail_next`].
    pub injected_failure: bool,
    pub at: Instant,
}

impl RecordedCall {
    /// `"POST /channels/*/messages"`: method (or `*`), then path segments where `*` matches one
    /// segment and a final `**` matches the rest.
    pub fn matches(&self, pattern: &str) -> bool {
        pattern_matches(pattern, &self.method, &self.path)
    }
}

/// An uploaded attachment as stored on a message.
#[derive(Clone, Debug)]
pub struct StoredAttachment {
    pub id: u64,
    pub filename: String,
    pub description: Option<String>,
    pub content_type: String,
    pub data: Vec<u8>,
}

impl StoredAttachment {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A message in the fake's state, after all edits.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub id: u64,
    pub channel_id: u64,
    pub guild_id: Option<u64>,
    pub author_id: u64,
    pub content: String,
    pub embeds: Vec<Value>,
    pub components: Vec<Value>,
    /// The `allowed_mentions` of the latest create/edit that carried one.
    pub allowed_mentions: Option<Value>,
    pub attachments: Vec<StoredAttachment>,
    pub flags: u64,
    pub edit_count: u32,
    /// Set for interaction responses and follow-ups.
    pub interaction_id: Option<u64>,
    pub(super) interaction_metadata: Option<Value>,
    pub(super) kind: u8,
    pub(super) created_ms: i64,
    pub(super) edited_ms: Option<i64>,
}

impl StoredMessage {
    pub fn is_ephemeral(&self) -> bool {
        self.flags & FLAG_EPHEMERAL != 0
    }

    /// All components inside the action rows (buttons, selects), in order.
    pub fn inner_components(&self) -> Vec<Value> {
        self.components
            .iter()
            .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// `custom_id`s of all components.
    pub fn custom_ids(&self) -> Vec<String> {
        self.inner_components()
            .iter()
            .filter_map(|c| c["custom_id"].as_str().map(str::to_string))
            .collect()
    }

    /// The component with this `custom_id`.
    pub fn component(&self, custom_id: &str) -> Option<Value> {
        self.inner_components()
            .into_iter()
            .find(|c| c["custom_id"] == custom_id)
    }

    /// All text a human would read: content plus embed titles, descriptions, fields, footer.
    pub fn all_text(&self) -> String {
        let mut s = self.content.clone();
        for e in &self.embeds {
            for k in ["title", "description"] {
                if let Some(t) = e[k].as_str() {
                    s.push('\n');
                    s.push_str(t);
                }
            }
            for f in e["fields"].as_array().into_iter().flatten() {
                s.push('\n');
                s.push_str(f["name"].as_str().unwrap_or(""));
                s.push('\n');
                s.push_str(f["value"].as_str().unwrap_or(""));
            }
            if let Some(t) = e["footer"]["text"].as_str() {
                s.push('\n');
                s.push_str(t);
            }
        }
        s
    }
}

/// Identifies an injected interaction.
#[derive(Clone, Debug)]
pub struct InteractionHandle {
    pub id: u64,
    pub token: String,
    /// 2 = application command, 3 = component, 5 = modal submit.
    pub kind: u8,
    pub channel_id: u64,
    /// The message the component/modal belongs to, if any.
    pub message_id: Option<u64>,
    pub user_id: u64,
    /// Gateway sequence number of the INTERACTION_CREATE dispatch.
    pub seq: u64,
}

/// Gateway counters.
#[derive(Clone, Debug, Default)]
pub struct GatewayStats {
    pub connected: bool,
    pub session_id: Option<String>,
    pub identify_count: usize,
    pub resume_count: usize,
    pub heartbeat_count: usize,
    pub last_seq: u64,
    /// Highest sequence number written to the current socket.
    pub delivered_seq: u64,
    pub intents: u64,
    /// The last IDENTIFY `d` payload.
    pub identify: Option<Value>,
}
