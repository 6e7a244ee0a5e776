use super::*;

fn sample() -> Vec<u8> {
    let dev = DeviceKey::new("shop", "user_3", "phone");
    let message = |id, entry: &str| Queued { id, queued_at: 1_000 + id, entry: entry.into() };
    let mut writer = SnapshotWriter::new(Vec::new(), 1, 100).unwrap();
    writer.record(Record::User { site: "shop".into(), user: "user_3".into(), rooms: vec!["staff".into()] }).unwrap();
    writer.record(Record::Device { key: dev.clone(), state: DeviceState::default() }).unwrap();
    writer.record(Record::Message { device: dev.clone(), message: message(7, r#"["a",1]"#), shared: true }).unwrap();
    writer
        .record(Record::Message { device: dev.clone(), message: message(9, r#"["b","\n"]"#), shared: false })
        .unwrap();
    let other = DeviceKey::new("shop", "user_3", "");
    writer.record(Record::Device { key: other.clone(), state: DeviceState::default() }).unwrap();
    writer.record(Record::Message { device: other, message: message(7, r#"["a",1]"#), shared: true }).unwrap();
    let record = Idempotency { key: "k".into(), fingerprint: 1, expires_at: 2 };
    writer.record(Record::Idempotency { site: "shop".into(), record }).unwrap();
    writer.finish().unwrap().1
}

fn records(bytes: &[u8]) -> Result<Vec<Record>, SnapshotError> {
    let mut reader = SnapshotReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(record) = reader.next_record()? {
        out.push(record);
    }
    Ok(out)
}

#[test]
fn a_snapshot_reads_back_record_for_record() {
    let bytes = sample();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert_eq!(text.lines().count(), 9);
    assert_eq!(text.matches(r#"["a",1]"#).count(), 1, "a shared message is written once:\n{text}");
    let read = records(&bytes).unwrap();
    assert_eq!(read.len(), 7);
    let Record::Message { message, shared: true, device } = &read[5] else { panic!("{:?}", read[5]) };
    assert_eq!((&*message.entry, message.id, &*device.device), (r#"["a",1]"#, 7, ""));
    let (header, summary) = check(&bytes[..]).unwrap();
    assert_eq!((header.next_id, summary.devices, summary.messages), (100, 2, 3));
    assert_eq!(summary.sites["shop"], SiteSummary { devices: 2, messages: 3, bytes: 24 });
}

#[test]
fn every_cut_and_every_changed_byte_is_refused() {
    let bytes = sample();
    for len in 0..bytes.len() {
        assert!(check(&bytes[..len]).is_err(), "cut at {len} accepted");
    }
    for at in 0..bytes.len() {
        for flip in [0x01, 0x20, 0x80] {
            let mut damaged = bytes.clone();
            damaged[at] ^= flip;
            assert!(check(&damaged[..]).is_err(), "byte {at} ^ {flip:#x} accepted");
        }
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"\n");
    assert!(check(&longer[..]).is_err());
}

/// Rewrites lines of a good snapshot and fixes up its checksum, to test the rules behind it.
fn edited(edit: impl Fn(&mut Vec<String>)) -> Vec<u8> {
    let text = String::from_utf8(sample()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let end = lines.pop().unwrap();
    edit(&mut lines);
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let mut end: serde_json::Value = serde_json::from_str(&end).unwrap();
    end["end"]["crc32"] = format!("{:08x}", crc32fast::hash(body.as_bytes())).into();
    format!("{body}{end}\n").into_bytes()
}

fn refusal(bytes: &[u8]) -> String {
    check(bytes).unwrap_err().to_string()
}

#[test]
fn records_out_of_place_are_refused_with_their_line() {
    let swapped = edited(|lines| lines.swap(3, 4)); // a queue out of order
    assert!(refusal(&swapped).starts_with("line 5: message id 7 does not follow 9"), "{}", refusal(&swapped));
    let orphan = edited(|lines| drop(lines.remove(2))); // the device record gone
    assert_eq!(refusal(&orphan), "line 3: a message before any device");
    let unknown = edited(|lines| drop(lines.remove(3))); // the shared message's full copy gone
    assert!(refusal(&unknown).contains("not written before"), "{}", refusal(&unknown));
    let counts = edited(|lines| drop(lines.remove(7)));
    assert!(refusal(&counts).contains("counts"), "{}", refusal(&counts));
    let newer = edited(|lines| lines[0] = lines[0].replace("\"version\":1", "\"version\":2"));
    assert!(refusal(&newer).contains("format version 2, this build reads 1"), "{}", refusal(&newer));
    let beyond = edited(|lines| lines[0] = lines[0].replace("\"next_id\":100", "\"next_id\":9"));
    assert!(refusal(&beyond).contains("not below next_id 9"), "{}", refusal(&beyond));
    assert!(refusal(b"").contains("empty file"));
    assert!(
        refusal(b"{\"format\":\"other\",\"version\":1,\"created_at\":0,\"next_id\":0}\n").contains("format \"other\"")
    );
}
