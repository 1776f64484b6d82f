//! A shard read page by page, the way `GetRecords` is documented to answer: a page can be empty
//! in the middle of a shard (the records are further on, and reaching them can take several
//! calls), so an empty page never ends a read. A read ends at the shard's end (no next
//! iterator: a closed shard read whole), when its reader has what it wants, or after a bounded
//! run of empty pages (an open shard's newest record, or records further than the bound).

use serde_json::Value;

use local_stack::stream::{StreamError, StreamReader};

/// Consecutive empty `GetRecords` pages after which a read stops, unless told otherwise. A
/// shard can answer empty pages in its middle, and reaching its records can take several
/// calls; a hundred is far more than that, and still ends in seconds. No pause between them: a
/// throttled call (`LimitExceededException`) is retried by the SDK with backoff.
pub const DEFAULT_MAX_EMPTY_PAGES: u32 = 100;

/// Records asked for per `GetRecords` call (the most it gives).
const PAGE_LIMIT: i32 = 1000;

/// How a read of a shard's pages ended, once [`ShardPages::next`] answered `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesEnd {
    /// No next iterator: a closed shard, read to its end.
    ShardEnd,
    /// This many empty pages in a row with a next iterator still given: an open shard's
    /// newest record, or records further on than the bound lets a read go.
    EmptyPages(u32),
}

/// The non-empty pages of one shard, from an iterator on.
pub struct ShardPages<'a> {
    reader: &'a StreamReader,
    next: Option<String>,
    empty_pages: u32,
    max_empty_pages: u32,
    end: Option<PagesEnd>,
}

impl<'a> ShardPages<'a> {
    /// Pages from `iterator` (`None`: a shard with nothing to read, ended at once).
    pub fn new(reader: &'a StreamReader, iterator: Option<String>, max_empty_pages: u32) -> Self {
        Self {
            reader,
            next: iterator,
            empty_pages: 0,
            max_empty_pages,
            end: None,
        }
    }

    /// The next page with records, through empty ones; `None` once the read has ended (see
    /// [`ShardPages::end`]).
    pub async fn next(&mut self) -> Result<Option<Vec<Value>>, StreamError> {
        while self.end.is_none() {
            let Some(iterator) = self.next.take() else {
                self.end = Some(PagesEnd::ShardEnd);
                break;
            };
            let (page, following) = self.reader.read(&iterator, PAGE_LIMIT).await?;
            self.next = following;
            if !page.is_empty() {
                self.empty_pages = 0;
                return Ok(Some(page));
            }
            self.empty_pages += 1;
            if self.next.is_some() && self.empty_pages >= self.max_empty_pages {
                self.end = Some(PagesEnd::EmptyPages(self.empty_pages));
            }
        }
        Ok(None)
    }

    /// How the read ended; `None` while it goes on.
    pub fn end(&self) -> Option<PagesEnd> {
        self.end
    }
}

/// Whether a stream error says the records are gone (past retention, or the shard expired),
/// rather than that the stream failed.
pub fn is_trimmed(e: &StreamError) -> bool {
    let text = format!("{e:?}");
    ["TrimmedDataAccess", "ResourceNotFound", "ExpiredIterator"]
        .iter()
        .any(|s| text.contains(s))
}
