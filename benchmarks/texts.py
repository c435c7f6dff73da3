"""Built-in sample texts for HTTP load tests: varied lengths, review-like and news-like.

Lengths run from a few words to a long paragraph, so batches mix short and long rows
(padding, token budgets and per-input routing all see some variety).
"""

from __future__ import annotations

SAMPLE_TEXTS: tuple[str, ...] = (
    "Great movie.",
    "Terrible.",
    "I loved every minute of it.",
    "The plot was thin and the acting was worse.",
    "A quiet, beautifully shot film about grief that never feels sentimental.",
    "Stocks rallied on Friday after the central bank held interest rates steady.",
    "The home side scored twice in the final ten minutes to win the cup.",
    "Researchers unveiled a chip that cuts the power needed to train neural networks.",
    "Not bad, but not memorable either.",
    "An absolute waste of two hours; I want my money back.",
    "The senate passed the budget bill late on Tuesday after weeks of negotiation.",
    "Oil prices fell for a third straight session as inventories rose more than expected.",
    "The striker signed a four-year contract with the club on Monday.",
    "Astronomers detected water vapour in the atmosphere of a distant exoplanet.",
    "Funny, warm and surprisingly clever, with a soundtrack I keep humming.",
    "It drags in the middle, yet the last act almost makes up for it.",
    "The company said quarterly revenue rose nine percent, beating analyst forecasts, "
    "while warning that higher shipping costs would weigh on margins next year.",
    "After a rain delay of nearly two hours, the defending champion came back from a set down "
    "to reach the semi-finals, where she will face the top seed on Thursday afternoon.",
    "The software update patches a security flaw that let attackers run code remotely "
    "on unpatched devices, the vendor said in an advisory published overnight.",
    "I went in expecting a cheap thriller and came out having watched one of the most "
    "carefully written character studies of the year; the lead performance is extraordinary, "
    "the supporting cast is just as good, and the final scene stayed with me for days.",
    "Leaders from more than forty countries gathered for talks on climate finance, but "
    "delegates said the draft agreement still left open how much wealthy nations would pay, "
    "who would administer the fund, and whether emerging economies would be asked to contribute.",
    "Dull.",
    "Five stars.",
    "The sequel keeps the jokes but loses the heart.",
    "Shares of the chipmaker jumped after it raised its full-year outlook.",
    "The marathon was won in a course record despite strong headwinds along the river.",
    "A new vaccine trial reported strong immune responses in older adults.",
    "Every scene feels padded, every line of dialogue is predictable, and the twist is "
    "visible from the opening credits.",
    "The museum reopened to the public after a two-year renovation of its main galleries.",
    "Honestly one of the best animated films I have seen in a long time.",
    "Regulators fined the bank for failing to monitor suspicious transactions over several years, "
    "the largest penalty of its kind, and ordered an independent review of its compliance systems "
    "to be completed within eighteen months.",
    "The coach praised the defence but said the team must convert more of its chances.",
)
