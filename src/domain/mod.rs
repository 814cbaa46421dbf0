//! The product's values, parsed once at the edge: a value of these types obeys its rules,
//! so nothing past the routes checks them again.

mod budget;
mod limits;

pub use budget::{BudgetOwner, BudgetPeriod, BudgetUse, Budgets, TokenBudget};
use caseless::Caseless;
pub use limits::Limits;
use strum::{Display, EnumIter, EnumString, IntoStaticStr};
use unicode_normalization::UnicodeNormalization;
use unicode_security::MixedScript;

/// A value that breaks one of its rules; `field` names the request field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// The highest balance an account may hold, and so the largest grant: far below where
/// 64-bit arithmetic overflows, and exact in every JSON client (JavaScript's numbers are
/// exact up to 2^53, about 9 * 10^15).
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

pub const MAX_USERNAME_CHARS: usize = 50;
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A username by Django's rules (1 to 50 characters, each a letter, a digit or one of
/// `@ . + - _`), written in one script so that look-alikes cannot pass for each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let length = text.chars().count();
        if length == 0 || length > MAX_USERNAME_CHARS {
            return Err(Invalid::new(
                "username",
                format!("username must be 1 to {MAX_USERNAME_CHARS} characters"),
            ));
        }
        let allowed = |c: char| c.is_alphanumeric() || matches!(c, '@' | '.' | '+' | '-' | '_');
        if !text.chars().all(allowed) {
            return Err(Invalid::new(
                "username",
                "username may contain only letters, digits and @ . + - _",
            ));
        }
        // UTS #39's test: Cyrillic `а` among Latin letters (`аdmin`) is refused, while
        // scripts that are written together (Japanese kana with Han) are not.
        if !text.is_single_script() {
            return Err(Invalid::new(
                "username",
                "username must not mix scripts (for example Latin and Cyrillic letters)",
            ));
        }
        Ok(Self(text.to_string()))
    }

    /// The username as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What makes two usernames the same account: compatibility-normalised (NFKC, so a
    /// fullwidth `ａｄｍｉｎ` is `admin` and the Kelvin sign is `K`) and case-folded.
    pub fn key(&self) -> String {
        username_key(&self.0)
    }

    /// A username offered at login: empty is refused, while a name no one could have
    /// registered is `None`, so that it fails as an unknown user would (after the same work).
    pub fn offered(text: &str) -> Result<Option<Self>, Invalid> {
        if text.is_empty() {
            return Err(Invalid::new("username", "username must not be empty"));
        }
        Ok(Self::parse(text).ok())
    }
}

/// NFKC, then Unicode default case folding, then NFKC again (folding can denormalise).
pub fn username_key(text: &str) -> String {
    text.nfkc().default_case_fold().nfkc().collect()
}

/// A password of at least the configured length in characters, at most 1024 bytes.
pub struct Password(String);

impl Password {
    pub fn parse(text: String, min_chars: usize, field: &'static str) -> Result<Self, Invalid> {
        if text.chars().count() < min_chars {
            return Err(Invalid::new(
                field,
                format!("{field} must be at least {min_chars} characters"),
            ));
        }
        Self::check_size(&text, field)?;
        Ok(Self(text))
    }

    /// A password offered to be checked (login, the old password of a change): only its
    /// size is limited, since the rules may have changed since it was chosen.
    pub fn offered(text: String, field: &'static str) -> Result<Self, Invalid> {
        if text.is_empty() {
            return Err(Invalid::new(field, format!("{field} must not be empty")));
        }
        Self::check_size(&text, field)?;
        Ok(Self(text))
    }

    fn check_size(text: &str, field: &'static str) -> Result<(), Invalid> {
        if text.len() > MAX_PASSWORD_BYTES {
            return Err(Invalid::new(
                field,
                format!("{field} must be at most {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// Passwords never reach a log through `{:?}`.
impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A chat message: 1 to `max_chars` characters, with something visible in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message(String);

impl Message {
    pub fn parse(text: String, max_chars: usize) -> Result<Self, Invalid> {
        if text
            .chars()
            .all(|c| c.is_whitespace() || renders_as_nothing(c))
        {
            return Err(Invalid::new("message", "message must not be empty"));
        }
        // PostgreSQL's text cannot hold it, and no one means to send it.
        if text.contains('\0') {
            return Err(Invalid::new(
                "message",
                "message must not contain NUL characters",
            ));
        }
        if text.chars().count() > max_chars {
            return Err(Invalid::new(
                "message",
                format!("message must be at most {max_chars} characters"),
            ));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The name a user gives an API key: 1 to 100 characters, something visible, no control
/// characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

pub const MAX_KEY_NAME_CHARS: usize = 100;

impl KeyName {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let name = text.trim();
        if name.is_empty() || name.chars().all(renders_as_nothing) {
            return Err(Invalid::new("name", "name must not be empty"));
        }
        if name.chars().count() > MAX_KEY_NAME_CHARS {
            return Err(Invalid::new(
                "name",
                format!("name must be at most {MAX_KEY_NAME_CHARS} characters"),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(Invalid::new(
                "name",
                "name must not contain control characters",
            ));
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Tokens an operator adds to a balance (or takes from it, when negative): 1 to
/// [`MAX_BALANCE`] either way. Whether the balance can take it is the ledger's to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantAmount(i64);

impl GrantAmount {
    pub fn parse(amount: i64) -> Result<Self, Invalid> {
        if amount == 0 || !(-MAX_BALANCE..=MAX_BALANCE).contains(&amount) {
            return Err(Invalid::new(
                "amount",
                format!("a grant must be 1 to {MAX_BALANCE} tokens, or -1 to -{MAX_BALANCE}"),
            ));
        }
        Ok(Self(amount))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// The key a client sends to make a retried chat return the first answer: 1 to 255
/// visible ASCII characters (spaces allowed inside), surrounding white space dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let key = text.trim();
        let well_formed = (1..=MAX_IDEMPOTENCY_KEY_BYTES).contains(&key.len())
            && key
                .bytes()
                .all(|byte| byte.is_ascii_graphic() || byte == b' ');
        if !well_formed {
            return Err(Invalid::new(
                "Idempotency-Key",
                format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"
                ),
            ));
        }
        Ok(Self(key.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which page of a history to show: at most `limit` (1 to 100, default 20) items with ids
/// below `before` (from the newest when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: i64,
    pub before: Option<i64>,
}

pub const DEFAULT_PAGE_SIZE: i64 = 20;
pub const MAX_PAGE_SIZE: i64 = 100;

impl PageRequest {
    /// The rows to read for this page: one more than it shows, to tell whether another
    /// page follows.
    pub fn and_one_more(self) -> Self {
        Self {
            limit: self.limit + 1,
            ..self
        }
    }

    /// From the text of `limit` and `cursor` (a `next` of an earlier page), either absent.
    pub fn parse(limit: Option<&str>, cursor: Option<&str>) -> Result<Self, Invalid> {
        let limit = match limit {
            None => DEFAULT_PAGE_SIZE,
            Some(text) => text
                .parse()
                .ok()
                .filter(|limit| (1..=MAX_PAGE_SIZE).contains(limit))
                .ok_or_else(|| {
                    Invalid::new("limit", format!("limit must be 1 to {MAX_PAGE_SIZE}"))
                })?,
        };
        let before = cursor
            .map(|text| {
                text.parse()
                    .ok()
                    .filter(|id: &i64| *id > 0)
                    .ok_or_else(|| Invalid::new("cursor", "cursor must be a `next` value"))
            })
            .transpose()?;
        Ok(Self { limit, before })
    }
}

/// One batch of a sweep over rows by id: at most `limit` ids above `after`, in order. The
/// next batch starts after the last id this one found, so rows a sweep leaves behind (a
/// refund that failed) hold back none after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdBatch {
    pub after: i64,
    pub limit: i64,
}

impl IdBatch {
    /// The first batch: the lowest `limit` ids.
    pub fn first(limit: i64) -> Self {
        Self { after: 0, limit }
    }

    /// The batch after this one, which found `ids`; `None` when this one was the last (it
    /// found fewer than it could).
    pub fn next(self, ids: &[i64]) -> Option<Self> {
        match ids.last() {
            Some(&last) if ids.len() as i64 == self.limit => Some(Self {
                after: last,
                ..self
            }),
            _ => None,
        }
    }
}

/// Where a chat is in its life. Its tokens are reserved when it is created, `Pending`;
/// an `Answered` chat keeps them as its charge, a `Failed` one was refunded, and an
/// `Abandoned` one (a stream whose client went away before the end) was either, as
/// `ABANDONED_STREAM_CHARGE` settled it.
/// It is stored and shown under its snake_case name (`pending`, ...), the name the
/// migrations' CHECK constraints and triggers use (see `db::columns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumString, Display, EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum ChatStatus {
    Pending,
    Answered,
    Failed,
    Abandoned,
}

impl ChatStatus {
    /// What a chat of this status costs its user, given the price it reserved and whether
    /// it was refunded: a pending chat holds its reservation, an answered one was charged
    /// it, a failed one nothing.
    pub fn tokens_charged(self, cost: i64, refunded: bool) -> i64 {
        match self {
            Self::Pending | Self::Answered => cost,
            Self::Failed => 0,
            Self::Abandoned if refunded => 0,
            Self::Abandoned => cost,
        }
    }
}

/// Why a balance moved: every ledger row has one. Stored and shown under its snake_case
/// name (`initial_grant`, ...), like [`ChatStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumString, Display, EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum LedgerReason {
    /// The starting balance of a new account.
    InitialGrant,
    /// Tokens added by an operator.
    Grant,
    /// A chat's price, taken when it is created.
    ChatReservation,
    /// A failed chat's price, given back.
    ChatRefund,
    /// An embeddings call's price, taken when it is made.
    Embedding,
    /// A failed embeddings call's price, given back.
    EmbeddingRefund,
    /// What a priced chat reserved beyond its charge, given back when it settled (a chat
    /// reserved in the ledger, before reservations of priced calls were held).
    ChatSettlement,
    /// What a priced embeddings call reserved beyond its charge, given back (as
    /// `ChatSettlement`).
    EmbeddingSettlement,
    /// A priced chat's charge, taken when it settles; its reservation was a hold.
    ChatCharge,
    /// A priced embeddings call's charge, taken when it settles.
    EmbeddingCharge,
}

/// Characters that show nothing: the default-ignorable ones below, and the blank Braille
/// pattern, which is a symbol by category but an empty cell on the screen.
fn renders_as_nothing(c: char) -> bool {
    c == '\u{2800}' || is_default_ignorable(c)
}

/// Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt, Unicode 15):
/// characters that render as nothing, such as the zero-width space. Written out because
/// no maintained crate exposes this one property; the list is short and stable.
fn is_default_ignorable(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8 | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

#[cfg(test)]
mod tests;
