//! "Edit & approve…" on a card: the button opens a modal holding the
//! request's arguments as pretty JSON, masked exactly as the card shows
//! them; its submit approves the request with the edited arguments
//! ([`crate::app::Gateway::approve_edited`] checks the edit and puts the
//! masked secrets back). Refusals are ephemeral and change nothing; the
//! card is edited by the outbox from the stored state (with the diff).

use super::{already, ephemeral, routing, Handler, Reply, HANDING_OVER, MODAL_CHECK};
use crate::app::{AppError, EditForm};
use crate::domain::edit::MAX_EDIT_TEXT;
use crate::domain::request::RequestId;
use routing::Route;
use serenity::all::{
    ActionRowComponent, ComponentInteraction, Context, CreateActionRow, CreateInputText,
    CreateInteractionResponse, CreateModal, InputTextStyle, ModalInteraction,
};

/// The modal's title and its input's label (Discord: at most 45 characters each).
const TITLE: &str = "Edit & approve";
const LABEL: &str = "Arguments as JSON (keep masks as shown)";

/// What the approver is told when the arguments do not fit in a form.
pub fn too_large(chars: usize) -> String {
    format!(
        "These arguments are too large to edit on Discord ({chars} characters as JSON; a form \
         holds at most {MAX_EDIT_TEXT}). Approve or deny the request as it is."
    )
}

impl Handler {
    /// The "Edit & approve…" button: checks what can be checked within the
    /// interaction's first seconds, then opens the modal.
    pub(super) async fn edit_open(
        &self,
        ctx: &Context,
        reply: &Reply<'_>,
        c: &ComponentInteraction,
        id: RequestId,
        admin: bool,
    ) {
        if self.0.stopping.is_cancelled() || !*self.0.lead.borrow() {
            reply.respond(&ctx.http, ephemeral(HANDING_OVER)).await;
            return;
        }
        let gw = &self.0.gw;
        let checked = tokio::time::timeout(MODAL_CHECK, async {
            let r = gw.status(id).await?;
            if r.state.is_terminal() {
                return Ok(Err(already(&r)));
            }
            if r.admin_only && !admin {
                return Ok(Err(
                    "This is a critical request: only a Keyturn admin may decide it.".to_string(),
                ));
            }
            if !self.0.cfg.allow_self_approval
                && r.user_id.as_deref() == Some(c.user.id.to_string().as_str())
            {
                return Ok(Err(
                    "You cannot approve a request made on your own behalf.".to_string()
                ));
            }
            gw.edit_form(id).await.map(Ok)
        })
        .await;
        let text = match checked {
            Ok(Ok(Ok(EditForm::Text(text)))) => text,
            Ok(Ok(Ok(EditForm::TooLarge(n)))) => {
                reply.respond(&ctx.http, ephemeral(too_large(n))).await;
                return;
            }
            Ok(Ok(Err(why))) => {
                reply.respond(&ctx.http, ephemeral(why)).await;
                return;
            }
            Ok(Err(e)) => {
                reply.respond(&ctx.http, ephemeral(refusal(id, e))).await;
                return;
            }
            Err(_) => {
                reply
                    .respond(
                        &ctx.http,
                        ephemeral("Keyturn is slow to answer right now; try the edit again."),
                    )
                    .await;
                return;
            }
        };
        let modal = CreateModal::new(Route::EditSubmit(id).custom_id(), TITLE).components(vec![
            CreateActionRow::InputText(
                CreateInputText::new(InputTextStyle::Paragraph, LABEL, routing::ARGS_INPUT)
                    .value(text)
                    .required(true)
                    .max_length(MAX_EDIT_TEXT as u16),
            ),
        ]);
        reply
            .respond(&ctx.http, CreateInteractionResponse::Modal(modal))
            .await;
    }

    /// The edit modal's submit: acknowledges at once, approves with the
    /// edited arguments, and says the outcome ephemerally.
    pub(super) async fn edit_submit(
        &self,
        ctx: &Context,
        m: &ModalInteraction,
        id: RequestId,
        admin: bool,
    ) {
        let reply = Reply::Modal(m);
        if self.0.stopping.is_cancelled() || !*self.0.lead.borrow() {
            reply.respond(&ctx.http, ephemeral(HANDING_OVER)).await;
            return;
        }
        let text = m
            .data
            .components
            .iter()
            .flat_map(|row| row.components.iter())
            .find_map(|c| match c {
                ActionRowComponent::InputText(t) if t.custom_id == routing::ARGS_INPUT => {
                    t.value.clone()
                }
                _ => None,
            })
            .unwrap_or_default();
        let gw = &self.0.gw;
        let ack = reply.respond(&ctx.http, CreateInteractionResponse::Acknowledge);
        let voter = format!("discord:{}", m.user.id);
        let work = async {
            let r = gw.status(id).await?;
            if !self.0.cfg.allow_self_approval
                && r.user_id.as_deref() == Some(m.user.id.to_string().as_str())
            {
                return Err(AppError::SelfApproval(voter.clone()));
            }
            gw.approve_edited(id, &voter, Some(m.user.name.clone()), &text, admin)
                .await
        };
        let ((), outcome) = tokio::join!(ack, work);
        let text = match outcome {
            Ok(v) if v.request.state.is_terminal() => {
                tracing::info!(request.id = %id, voter = %voter, "approved with edits on Discord");
                "Approved with your edits.".to_string()
            }
            Ok(v) => format!(
                "Your approval with edits is recorded ({} of {} needed); the next approver sees \
                 the edited arguments.",
                v.have, v.need
            ),
            Err(AppError::AlreadyDecided(_)) => match gw.status(id).await {
                Ok(r) => already(&r),
                Err(_) => "This request is already decided.".into(),
            },
            Err(e) => refusal(id, e),
        };
        reply.follow(&ctx.http, text).await;
    }
}

/// What the approver is told when an edit is refused: the app's message
/// where it is safe to show, else a generic one (logged).
fn refusal(id: RequestId, e: AppError) -> String {
    match e {
        AppError::InvalidParams(m) => format!("Edit refused: {m}"),
        AppError::AdminOnly => {
            "This is a critical request (or the edit makes it one): only a Keyturn admin may \
             approve it."
                .into()
        }
        AppError::SelfApproval(_) => "You cannot approve a request made on your own behalf.".into(),
        AppError::AlreadyVoted(_) => "You have already voted on this request.".into(),
        AppError::NotFound(_) => "Keyturn has no such request.".into(),
        AppError::Run { message, .. } => format!("Edit refused: {message}"),
        e => {
            tracing::error!(request.id = %id, error = %e, "edit and approve failed");
            "Something went wrong; nothing was approved and the request is unchanged.".into()
        }
    }
}
