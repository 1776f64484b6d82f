//! Rendering a refresh's document from the record's new image: in planning, or after
//! collapsing for the ops that will be sent.

use serde_json::Value;

use super::record::field;
use super::Invalidator;
use crate::cache::{Cache, CacheOp, OpKind};
use crate::document::Document;

/// When a refresh's document is built: in planning, or once collapsing has picked the ops that
/// will be sent (`Invalidator::handle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Render {
    Now,
    Later,
}

impl<C: Cache> Invalidator<C> {
    /// Writes the document of a refresh into `op` from the record's new image. An image with
    /// no JSON form makes the op a delete at the same position: right whatever the change was,
    /// and its position is still recorded, so an older record replayed later is refused.
    pub(super) fn render(&self, op: &mut CacheOp, new_image: &Value) {
        let OpKind::Set { value, .. } = &mut op.kind else {
            return;
        };
        match Document::from_image(new_image) {
            Ok(doc) => *value = doc.into_string(),
            Err(error) => {
                tracing::warn!(%error, key = op.key, "new image has no JSON form; deleting instead");
                op.kind = OpKind::Delete;
            }
        }
    }

    /// [`Invalidator::render`] from a raw record, for a refresh the plan left unrendered.
    pub(super) fn render_from(&self, op: &mut CacheOp, raw: &Value) {
        let OpKind::Set { value, .. } = &op.kind else {
            return;
        };
        if !value.is_empty() {
            return;
        }
        let image = field(raw, "dynamodb")
            .and_then(|c| c.get("NewImage"))
            .unwrap_or(&Value::Null);
        self.render(op, image);
    }
}
