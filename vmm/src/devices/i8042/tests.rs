//! The controller against what Linux's i8042 and atkbd drivers send, and its saved state.

use super::*;

fn device() -> (I8042, Arc<VmControl>) {
    let control = Arc::new(VmControl::new().unwrap());
    let dev = I8042::new(
        IrqLine::new(KBD_IRQ).unwrap(),
        IrqLine::new(AUX_IRQ).unwrap(),
        control.clone(),
    );
    (dev, control)
}

fn out(d: &mut I8042, offset: u64, v: u8) {
    d.write(offset, &[v]);
}
fn inb(d: &mut I8042, offset: u64) -> u8 {
    let mut b = [0u8];
    d.read(offset, &mut b);
    b[0]
}
fn drain(d: &mut I8042) -> Vec<u8> {
    let mut v = Vec::new();
    while inb(d, 4) & STATUS_OBF != 0 {
        v.push(inb(d, 0));
    }
    v
}

#[test]
fn reset_command_requests_reboot() {
    let (mut d, control) = device();
    out(&mut d, 4, 0xaa);
    assert!(!control.is_stopping());
    out(&mut d, 4, CMD_RESET);
    assert_eq!(control.reason(), Some(ExitReason::Reboot));
}

#[test]
fn answers_linux_probe_sequence() {
    let (mut d, control) = device();
    out(&mut d, 4, CMD_SELF_TEST);
    assert_eq!(drain(&mut d), vec![0x55]);
    out(&mut d, 4, CMD_READ_CTR);
    let ctr = drain(&mut d)[0];
    assert_eq!(ctr & CTR_XLATE, CTR_XLATE);
    out(&mut d, 4, CMD_WRITE_CTR);
    out(&mut d, 0, ctr | CTR_AUXINT);
    out(&mut d, 4, CMD_READ_CTR);
    assert_eq!(drain(&mut d), vec![ctr | CTR_AUXINT]);
    // AUX loopback echoes with the AUX flag set.
    out(&mut d, 4, CMD_WRITE_AUX_BUFFER);
    out(&mut d, 0, 0x5a);
    assert_eq!(inb(&mut d, 4) & STATUS_AUXDATA, STATUS_AUXDATA);
    assert_eq!(drain(&mut d), vec![0x5a]);
    out(&mut d, 0, 0xf2);
    assert_eq!(drain(&mut d), vec![KBD_ACK, 0xab, 0x83]);
    out(&mut d, 0, 0xed);
    out(&mut d, 0, 0x07);
    assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK]);
    assert!(kbd_irq_count(&d) > 0);
    assert!(!control.is_stopping());
}

fn kbd_irq_count(d: &I8042) -> u64 {
    d.kbd_irq().eventfd().read().unwrap_or(0)
}

/// A controller with a written command byte, two unread identify bytes and an AUX
/// loopback command waiting for its data byte.
fn mid_conversation() -> I8042 {
    let (mut d, _) = device();
    out(&mut d, 4, CMD_WRITE_CTR);
    out(&mut d, 0, CTR_KBDINT | CTR_AUXINT | CTR_XLATE);
    out(&mut d, 0, 0xf2);
    assert_eq!(inb(&mut d, 0), KBD_ACK);
    out(&mut d, 4, CMD_WRITE_AUX_BUFFER);
    d
}

#[test]
fn restored_controller_answers_where_the_saved_one_was() {
    let saved = mid_conversation().state();
    let (mut d, control) = device();
    d.restore(&saved).unwrap();
    assert_eq!(kbd_irq_count(&d), 1, "the head byte's interrupt is raised again");
    // OBF, command-port bit; no SYS: the guest's command byte cleared it.
    assert_eq!(inb(&mut d, 4), STATUS_UNLOCKED | STATUS_OBF | STATUS_CMD);
    assert_eq!(drain(&mut d), vec![0xab, 0x83]);
    assert_eq!(inb(&mut d, 0), 0x83, "an empty buffer repeats the last byte");
    // The AUX loopback command still waits for its byte.
    out(&mut d, 0, 0x5a);
    assert_eq!(inb(&mut d, 4) & STATUS_AUXDATA, STATUS_AUXDATA);
    assert_eq!(drain(&mut d), vec![0x5a]);
    out(&mut d, 4, CMD_READ_CTR);
    assert_eq!(drain(&mut d), vec![CTR_KBDINT | CTR_AUXINT | CTR_XLATE]);
    assert!(!control.is_stopping());
}

#[test]
fn state_round_trips_through_json() {
    let saved = mid_conversation().state();
    let json = serde_json::to_string(&saved).unwrap();
    assert_eq!(serde_json::from_str::<I8042State>(&json).unwrap(), saved);
    let (mut d, _) = device();
    d.restore(&saved).unwrap();
    assert_eq!(d.state(), saved);
}

#[test]
fn impossible_states_are_refused() {
    let good = mid_conversation().state();
    let (mut d, _) = device();
    let before = d.state();
    let mut long = good.clone();
    long.output = vec![I8042Byte { byte: 0, aux: false }; BUFFER_LIMIT + 1];
    let mut command = good.clone();
    command.pending_command = Some(CMD_SELF_TEST);
    let mut kbd = good;
    kbd.pending_kbd_command = Some(0xf2);
    for bad in [long, command, kbd] {
        assert!(matches!(
            d.restore(&bad),
            Err(StateError::Invalid { what: "i8042", .. })
        ));
    }
    assert_eq!(d.state(), before, "a refused state changes nothing");
}

#[test]
fn ctrl_alt_del_follows_translation_mode() {
    let (mut d, _) = device();
    d.inject_ctrl_alt_del();
    assert_eq!(drain(&mut d), CTRL_ALT_DEL_SET1.to_vec());
    out(&mut d, 4, CMD_WRITE_CTR);
    out(&mut d, 0, CTR_KBDINT);
    d.inject_ctrl_alt_del();
    assert_eq!(drain(&mut d), CTRL_ALT_DEL_SET2.to_vec());
}
