#!/usr/bin/env python3
"""Generates the example domain datasets in data/ (legal, medical, chatbot), deterministically.

Each domain's answers follow a distinct, checkable format (see FORMATS; `loraplex eval
--format-regex` and configs/train-*.toml use the same regexes):
  legal   — a citation-style answer:  ANSWER: ... / AUTHORITY: <Act> § <n> / CONFIDENCE: <level>
  medical — a structured triage note: TRIAGE: <level> / FINDINGS: ... / NEXT STEP: ...
  chatbot — the company's numbered procedure: PROCEDURE <CODE> / 1. ... / 2. ... / 3. ...
Run: python3 scripts/make_example_data.py   (writes data/<domain>/{train,val,test}.jsonl)
"""
import json
import random
from pathlib import Path

FORMATS = {
    "legal": r"^ANSWER: [^\n]+\nAUTHORITY: [A-Z][A-Za-z ]+ Act § \d+\nCONFIDENCE: (high|medium|low)$",
    "medical": r"^TRIAGE: (emergency|urgent|routine)\nFINDINGS: [^\n]+\nNEXT STEP: [^\n]+$",
    "chatbot": r"^PROCEDURE [A-Z]{2}-\d{3}\n1\. [^\n]+\n2\. [^\n]+\n3\. [^\n]+$",
}

R = random.Random(20261124)

LEGAL_TOPICS = [
    ("a landlord keep a security deposit for normal wear and tear", "No, normal wear and tear cannot be deducted from the deposit", "Tenancy Deposits Act"),
    ("an employer fire someone for filing a safety complaint", "No, dismissal for a protected safety complaint is unlawful", "Workplace Safety Act"),
    ("a shop refuse a refund for a faulty product", "No, a faulty product entitles the buyer to a repair, replacement or refund", "Consumer Rights Act"),
    ("a company keep personal data after the customer asks for deletion", "Generally no, personal data must be erased on request unless a legal duty requires keeping it", "Data Protection Act"),
    ("a tenant withhold rent because of needed repairs", "Not without following the repair notice procedure first", "Residential Tenancies Act"),
    ("a contract signed by a minor be enforced", "Usually not, contracts with minors are voidable except for necessities", "Contracts Act"),
    ("a neighbour build a fence on the property line without consent", "No, boundary structures need the consent of both owners", "Property Boundaries Act"),
    ("an employee be required to work unpaid overtime", "No, all hours worked must be paid at least at the minimum rate", "Fair Wages Act"),
    ("a seller cancel an online order after payment", "Only if the contract terms allow it and the payment is refunded promptly", "Electronic Commerce Act"),
    ("a driver be fined for parking in a loading zone at night", "Yes, if the signs show the restriction applies at night", "Road Traffic Act"),
    ("a bank charge a fee for closing an account", "Only if the fee was disclosed in the account terms", "Banking Services Act"),
    ("a school share student grades with other parents", "No, grades are confidential student records", "Education Records Act"),
]
LEGAL_ASK = ["Can {}?", "Is it legal for {}?", "Quick question: can {}?", "My friend asks whether {}. Can they?", "Under the law, may {}?"]
LEGAL_SUBJ = ["", " in my situation", " if there is no written contract", " after thirty days", " when the other side disagrees"]

MED_CASES = [
    ("crushing chest pain spreading to the left arm", "emergency", "chest pain with radiation, possible cardiac event", "call emergency services now"),
    ("a mild sore throat for two days without fever", "routine", "mild pharyngitis symptoms, no fever", "rest, fluids and review in a week if not better"),
    ("sudden weakness on one side of the face", "emergency", "acute facial weakness, possible stroke", "call emergency services now"),
    ("a high fever of 39.5 C for three days", "urgent", "persistent high fever", "see a doctor today"),
    ("a small cut on the finger that stopped bleeding", "routine", "minor superficial wound", "clean and cover, watch for infection"),
    ("shortness of breath when walking up stairs for a week", "urgent", "new exertional breathlessness", "see a doctor within 24 hours"),
    ("a rash after starting a new antibiotic", "urgent", "possible drug reaction", "stop the drug and contact a doctor today"),
    ("lower back pain after lifting a box", "routine", "mechanical back strain", "gentle activity and pain relief, review if worse"),
    ("severe headache with a stiff neck and fever", "emergency", "headache, neck stiffness and fever, possible meningitis", "go to the emergency department now"),
    ("blurred vision in one eye since this morning", "urgent", "acute monocular visual change", "same-day eye assessment"),
    ("a cough with green sputum for five days", "routine", "productive cough, likely chest infection", "see a doctor if not improving in 48 hours"),
    ("fainting while standing in a hot room", "urgent", "syncope episode", "see a doctor today for assessment"),
]
MED_ASK = ["Patient reports {}.", "I have {}. What should I do?", "Triage this: {}.", "My father has {}.", "Adult patient with {}."]

BOT_TASKS = [
    ("reset my VPN password", "IT-101", ["Open the self-service portal", "Choose Reset VPN password and confirm with your badge number", "Sign in to the VPN client with the new password"]),
    ("book a meeting room", "FA-214", ["Open the room calendar in the intranet", "Pick a free room and time slot", "Add the cost centre and confirm the booking"]),
    ("submit a travel expense", "FI-330", ["Scan all receipts into the expense tool", "Assign each receipt to the trip number", "Send the report to your manager for approval"]),
    ("request a new laptop", "IT-145", ["Raise a hardware ticket in the service desk", "Attach your manager's approval", "Collect the laptop from IT when notified"]),
    ("report a phishing email", "SE-007", ["Do not click any link in the email", "Use the Report Phishing button in the mail client", "Delete the email after the confirmation arrives"]),
    ("change my bank details for payroll", "HR-220", ["Open the HR portal and go to Payroll", "Enter the new account details", "Upload a bank statement to confirm the change"]),
    ("get access to a shared drive", "IT-188", ["Find the drive owner in the directory", "Request access in the access portal", "Wait for the owner's approval email"]),
    ("register a visitor", "FA-102", ["Enter the visitor's name in the reception system", "Print the visitor badge at reception", "Accompany the visitor at all times"]),
    ("order office supplies", "FA-150", ["Open the supplies catalogue", "Add the items to the basket with your cost centre", "Submit the order before Thursday noon"]),
    ("take parental leave", "HR-305", ["Tell your manager at least eight weeks ahead", "Fill in the leave form in the HR portal", "Agree a handover plan with your team"]),
    ("install approved software", "IT-160", ["Open the software centre", "Search for the approved application", "Click Install and restart if asked"]),
    ("report a broken chair", "FA-120", ["Take a photo of the damage", "Log a facilities ticket with the photo", "Label the chair as out of use"]),
]
BOT_ASK = ["How do I {}?", "What is the process to {}?", "I need to {}.", "Can you tell me how to {}?", "Steps to {} please"]


def legal():
    out = []
    for topic, ans, act in LEGAL_TOPICS:
        for ask in LEGAL_ASK:
            for subj in LEGAL_SUBJ:
                q = ask.format(topic + subj)
                sec = 10 + (abs(hash_str(act)) % 90)
                conf = "high" if subj == "" else ("medium" if "contract" not in subj else "low")
                out.append({"instruction": q, "output": f"ANSWER: {ans}.\nAUTHORITY: {act} § {sec}\nCONFIDENCE: {conf}"})
    return out


def medical():
    out = []
    for case, level, finding, step in MED_CASES:
        for ask in MED_ASK:
            for age in ["", " The patient is 70 years old.", " The patient is 25 years old.", " It started yesterday.", " No known allergies."]:
                out.append({"instruction": ask.format(case) + age,
                            "output": f"TRIAGE: {level}\nFINDINGS: {finding}\nNEXT STEP: {step}"})
    return out


def chatbot():
    out = []
    for task, code, steps in BOT_TASKS:
        for ask in BOT_ASK:
            for pre in ["", "Hi! ", "Hello, ", "Quick one: ", "Please help. "]:
                out.append({"messages": [{"role": "user", "content": pre + ask.format(task)},
                                         {"role": "assistant", "content": f"PROCEDURE {code}\n1. {steps[0]}\n2. {steps[1]}\n3. {steps[2]}"}]})
    return out


def hash_str(s):
    h = 0
    for c in s:
        h = (h * 31 + ord(c)) % 1_000_003
    return h


def main():
    root = Path(__file__).resolve().parent.parent / "data"
    for name, rows in [("legal", legal()), ("medical", medical()), ("chatbot", chatbot())]:
        R.shuffle(rows)
        n = len(rows)
        n_test, n_val = n // 10, n // 10
        splits = {"test": rows[:n_test], "val": rows[n_test:n_test + n_val], "train": rows[n_test + n_val:]}
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for split, part in splits.items():
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        (d / "format.regex").write_text(FORMATS[name] + "\n")
        print(f"{name}: {len(splits['train'])} train, {len(splits['val'])} val, {len(splits['test'])} test")


if __name__ == "__main__":
    main()
