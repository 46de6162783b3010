"""`python -m offline.sample_catalog --out examples/`: generate the demo catalog and judgments, deterministically.

Products are templates (category, product type, brands, attribute choices, price range); a title is
"<brand> <attributes> <product type>". Queries name a product type (several wordings, some with no
word in common with the titles), optionally narrowed by a brand or an attribute. Relevance, 1..3:
3 = the right type and every brand/attribute the query names; 2 = the right type, another
brand/attribute; 1 = a same-category or same-brand product of another type (judged, irrelevant).
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import polars as pl

SEED = 13
MAX_PER_TYPE = 13
CATALOG_FILE = "catalog.csv"
JUDGMENTS_FILE = "judgments.csv"


@dataclass(frozen=True)
class ProductType:
    category: str
    name: str  # as it ends a title
    queries: tuple[str, ...]  # how shoppers ask for it
    brands: tuple[str, ...]
    attributes: tuple[tuple[str, ...], ...]  # one choice from each group, "" = none
    price: tuple[float, float]


def _t(category: str, name: str, queries: str, brands: str, attributes: str, lo: float, hi: float) -> ProductType:
    """Compact template: queries and brands split on ';', attribute groups on '|', choices on ';'."""
    return ProductType(
        category=category,
        name=name,
        queries=tuple(queries.split(";")),
        brands=tuple(brands.split(";")),
        attributes=tuple(tuple(group.split(";")) for group in attributes.split("|")),
        price=(lo, hi),
    )


PRODUCT_TYPES: tuple[ProductType, ...] = (
    _t(
        "Power Tools",
        "Cordless Drill/Driver Kit",
        "cordless drill;drill driver",
        "DeWalt;Milwaukee;Ryobi;Makita",
        "12V;18V;20V MAX|Brushless;Compact",
        59,
        229,
    ),
    _t(
        "Power Tools",
        "Circular Saw",
        "circular saw;skil saw",
        "DeWalt;Makita;Skil;Ryobi",
        "7-1/4 in.;6-1/2 in.|Corded 15 Amp;Cordless 18V",
        49,
        199,
    ),
    _t(
        "Power Tools",
        "Impact Driver",
        "impact driver",
        "DeWalt;Milwaukee;Ryobi;Makita",
        "12V;18V;20V MAX|Brushless;|1/4 in. Hex",
        79,
        219,
    ),
    _t(
        "Power Tools",
        "Random Orbital Sander",
        "orbital sander;palm sander",
        "Bosch;DeWalt;Ryobi;Makita",
        "5 in.|Variable Speed;Corded 3 Amp;Cordless 18V",
        39,
        129,
    ),
    _t(
        "Power Tools",
        "Oscillating Multi-Tool",
        "oscillating tool;multi tool",
        "DeWalt;Milwaukee;Dremel;Ryobi",
        "Corded;Cordless 18V|Quick-Change;Tool-Free Blade Change",
        49,
        179,
    ),
    _t(
        "Hand Tools",
        "Claw Hammer",
        "hammer;claw hammer",
        "Estwing;Stanley;Husky",
        "16 oz.;20 oz.;22 oz.|Fiberglass Handle;Steel Handle;Wood Handle",
        12,
        45,
    ),
    _t(
        "Hand Tools",
        "Screwdriver Set",
        "screwdriver set;screwdrivers",
        "Husky;Stanley;Klein Tools",
        "6-Piece;10-Piece;14-Piece|Magnetic Tip;Cushion Grip",
        14,
        49,
    ),
    _t(
        "Hand Tools",
        "Tape Measure",
        "tape measure;measuring tape",
        "Stanley;Milwaukee;Komelon",
        "16 ft.;25 ft.;35 ft.|Magnetic Hook;Auto Lock",
        8,
        32,
    ),
    _t(
        "Hand Tools",
        "Adjustable Wrench",
        "adjustable wrench;crescent wrench",
        "Husky;Crescent;Channellock",
        "6 in.;8 in.;10 in.;12 in.|Chrome;Black Oxide",
        9,
        35,
    ),
    _t(
        "Paint",
        "Interior Paint",
        "interior paint;wall paint",
        "Behr;Glidden;Valspar",
        "1 gal.;5 gal.|Eggshell;Satin;Flat;Semi-Gloss|White;Swiss Coffee;Gray;Beige",
        24,
        189,
    ),
    _t(
        "Paint",
        "Exterior Deck Stain",
        "deck stain;wood stain",
        "Behr;Thompson's WaterSeal;Cabot",
        "1 gal.|Semi-Transparent;Solid Color;Transparent|Cedar;Redwood;Slate Gray",
        29,
        59,
    ),
    _t(
        "Paint",
        "Paint Roller Kit",
        "paint roller;roller kit",
        "Wooster;Purdy;Husky",
        "9 in.|3/8 in. Nap;1/2 in. Nap|3-Piece;5-Piece",
        9,
        29,
    ),
    _t(
        "Paint", "Spray Paint", "spray paint", "Rust-Oleum;Krylon", "12 oz.|Gloss;Satin;Flat|Black;White;Red;Blue", 4, 9
    ),
    _t(
        "Plumbing",
        "Bathroom Faucet",
        "bathroom faucet;bathroom sink faucet",
        "Moen;Delta;Pfister;Glacier Bay",
        "Single-Handle;Widespread 2-Handle|Brushed Nickel;Chrome;Matte Black;Oil-Rubbed Bronze",
        49,
        249,
    ),
    _t(
        "Plumbing",
        "Kitchen Faucet",
        "kitchen faucet;kitchen sink faucet",
        "Moen;Delta;Pfister;Glacier Bay",
        "Pull-Down;Pull-Out;Single-Handle|Stainless Steel;Chrome;Matte Black",
        79,
        329,
    ),
    _t(
        "Plumbing",
        "Toilet",
        "toilet;commode",
        "American Standard;Kohler;Glacier Bay;TOTO",
        "2-Piece;1-Piece|1.28 GPF;1.6 GPF|Elongated;Round|White;Biscuit",
        99,
        499,
    ),
    _t(
        "Plumbing",
        "Water Heater",
        "water heater;hot water tank",
        "Rheem;A.O. Smith",
        "40 Gal.;50 Gal.|Electric;Natural Gas|6-Year;9-Year",
        449,
        899,
    ),
    _t(
        "Plumbing",
        "Shower Head",
        "shower head;showerhead",
        "Moen;Delta;Glacier Bay",
        "Rain;Handheld;Fixed|Chrome;Brushed Nickel|1.8 GPM;2.5 GPM",
        19,
        149,
    ),
    _t(
        "Electrical",
        "LED Light Bulb",
        "led light bulb;led bulb",
        "Philips;EcoSmart;Feit Electric;GE",
        "40-Watt Equivalent;60-Watt Equivalent;100-Watt Equivalent|A19;BR30|Soft White;Daylight|2-Pack;4-Pack",
        4,
        24,
    ),
    _t(
        "Electrical",
        "Outdoor Flood Light",
        "flood light;motion sensor light;security light",
        "Defiant;Halo;Lithonia Lighting",
        "LED|Motion Sensor;Dusk to Dawn|Bronze;White;Black",
        24,
        99,
    ),
    _t(
        "Electrical",
        "Extension Cord",
        "extension cord;power cord",
        "Husky;Woods;Southwire",
        "25 ft.;50 ft.;100 ft.|16/3;14/3;12/3|Outdoor;Indoor",
        12,
        89,
    ),
    _t(
        "Electrical",
        "Light Switch",
        "light switch;dimmer switch",
        "Leviton;Lutron",
        "Single-Pole;3-Way|Toggle;Rocker;Dimmer|White;Light Almond",
        3,
        39,
    ),
    _t(
        "Electrical",
        "Ceiling Fan",
        "ceiling fan",
        "Hampton Bay;Home Decorators Collection;Hunter",
        "44 in.;52 in.;60 in.|LED Indoor;Indoor/Outdoor|Brushed Nickel;Matte Black;White|with Light Kit;with Remote",
        79,
        349,
    ),
    _t(
        "Lumber",
        "Pressure-Treated Lumber",
        "pressure treated lumber;treated wood",
        "Severe Weather;WeatherShield",
        "2 in. x 4 in.;2 in. x 6 in.;4 in. x 4 in.|8 ft.;10 ft.;12 ft.",
        4,
        22,
    ),
    _t(
        "Hardware",
        "Drywall Screws",
        "drywall screws;sheetrock screws",
        "Grip-Rite;GRK Fasteners;Everbilt",
        "#6 x 1-1/4 in.;#6 x 1-5/8 in.;#8 x 2 in.|Coarse Thread;Fine Thread|1 lb. Box;5 lb. Box",
        7,
        39,
    ),
    _t(
        "Hardware",
        "Angle Bracket",
        "angle bracket;l bracket",
        "Simpson Strong-Tie;Everbilt",
        "12-Gauge;18-Gauge|Galvanized;Zinc-Plated|1-1/2 in.;3 in.",
        1,
        9,
    ),
    _t(
        "Building Materials",
        "Concrete Mix",
        "concrete mix;cement",
        "Quikrete;Sakrete",
        "50 lb.;60 lb.;80 lb.|Fast-Setting;High-Strength;Crack-Resistant",
        4,
        12,
    ),
    _t(
        "Outdoors",
        "Garden Hose",
        "garden hose;water hose",
        "Flexzilla;Gilmour;Melnor",
        "1/2 in. x 25 ft.;5/8 in. x 50 ft.;5/8 in. x 100 ft.|Heavy Duty;Lightweight",
        19,
        89,
    ),
    _t(
        "Outdoors",
        "Lawn Mower",
        "lawn mower;push mower",
        "Toro;Ryobi;Honda;EGO",
        "21 in.|Gas Self-Propelled;Cordless Electric Push;Gas Push|Mulching;Bagging",
        229,
        649,
    ),
    _t(
        "Outdoors",
        "String Trimmer",
        "string trimmer;weed eater;weed wacker",
        "EGO;Ryobi;Husqvarna;Toro",
        "13 in.;15 in.|40V Cordless;Gas 2-Cycle",
        99,
        299,
    ),
    _t(
        "Flooring",
        "Vinyl Plank Flooring",
        "vinyl plank flooring;lvp flooring",
        "LifeProof;TrafficMaster",
        "Sterling Oak;Seasoned Wood;Gray Pine;Harbor Oak|7.1 in. x 47.6 in.|Waterproof Click Lock",
        2,
        5,
    ),
    _t(
        "Storage",
        "Tool Chest",
        "tool chest;tool box",
        "Husky;Milwaukee",
        "26 in. W;46 in. W;52 in. W|5-Drawer;9-Drawer;15-Drawer|Black;Red",
        149,
        999,
    ),
)


@dataclass(frozen=True)
class Item:
    item_id: str
    kind: ProductType
    brand: str
    attributes: tuple[str, ...]
    price: float

    @property
    def title(self) -> str:
        return " ".join([self.brand, *(a for a in self.attributes if a), self.kind.name])


def _price(rng: random.Random, lo: float, hi: float) -> float:
    return round(max(round(rng.uniform(lo, hi)), 1) - 0.03, 2)  # shelf prices end in .97


def generate_items(seed: int = SEED) -> list[Item]:
    rng = random.Random(seed)
    items: list[Item] = []
    for kind in PRODUCT_TYPES:
        combos = list(itertools.product(kind.brands, *kind.attributes))
        rng.shuffle(combos)
        for brand, *attributes in combos[:MAX_PER_TYPE]:
            items.append(Item(f"sku-{len(items) + 1:05d}", kind, brand, tuple(attributes), _price(rng, *kind.price)))
    return items


def _judge(query: str, items: Sequence[Item], relevance: dict[str, int]) -> list[dict]:
    return [
        {"query": query, "item_id": i.item_id, "relevance": relevance[i.item_id]}
        for i in items
        if i.item_id in relevance
    ]


def _related(item: Item, others: Sequence[Item], rng: random.Random, n: int, *, by_brand: bool) -> list[Item]:
    """A few products of another type that share the category (or brand): judged irrelevant."""
    pool = [
        o
        for o in others
        if o.kind is not item.kind and (o.brand == item.brand if by_brand else o.kind.category == item.kind.category)
    ]
    return rng.sample(pool, min(n, len(pool)))


def generate_judgments(items: Sequence[Item], seed: int = SEED) -> list[dict]:
    """Per product type: each wording alone, plus one brand- and one attribute-narrowed query."""
    rng = random.Random(seed + 1)
    rows: list[dict] = []
    for kind in PRODUCT_TYPES:
        own = [i for i in items if i.kind is kind]
        negatives = _related(own[0], items, rng, 3, by_brand=False)
        for wording in kind.queries:
            grades = {i.item_id: 3 for i in own} | {n.item_id: 1 for n in negatives}
            rows += _judge(wording, items, grades)
        brand = rng.choice(sorted({i.brand for i in own}))
        branded = next(i for i in own if i.brand == brand)
        grades = {i.item_id: 3 if i.brand == brand else 2 for i in own}
        grades |= {n.item_id: 1 for n in _related(branded, items, rng, 3, by_brand=True)}
        rows += _judge(f"{brand.lower()} {kind.queries[0]}", items, grades)
        choices = sorted({a for i in own for a in i.attributes if a and sum(a in j.attributes for j in own) < len(own)})
        if choices:
            attribute = rng.choice(choices)
            grades = {i.item_id: 3 if attribute in i.attributes else 2 for i in own}
            grades |= {n.item_id: 1 for n in negatives[:2]}
            rows += _judge(f"{attribute.lower()} {kind.queries[0]}", items, grades)
    return rows


def catalog_frame(items: Sequence[Item], seed: int = SEED) -> pl.DataFrame:
    """The catalog table, with business columns drawn from their own RNG (titles/judgments unchanged)."""
    rng = random.Random(seed + 1)
    launch = date(2024, 1, 1)
    return pl.DataFrame(
        {
            "item_id": [i.item_id for i in items],
            "title": [i.title for i in items],
            "category": [i.kind.category for i in items],
            "brand": [i.brand for i in items],
            "price": [i.price for i in items],
            "popularity": [int(rng.lognormvariate(4.0, 1.2)) for _ in items],  # units sold last 90 days
            "rating": [round(rng.uniform(3.0, 5.0), 1) for _ in items],
            "in_stock": [rng.random() < 0.9 for _ in items],
            "created_at": [(launch + timedelta(days=rng.randrange(0, 700))).isoformat() for _ in items],
        }
    )


def write(out: Path, seed: int = SEED) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    items = generate_items(seed)
    catalog, judgments = out / CATALOG_FILE, out / JUDGMENTS_FILE
    catalog_frame(items, seed).write_csv(catalog)
    pl.DataFrame(
        generate_judgments(items, seed), schema={"query": pl.Utf8, "item_id": pl.Utf8, "relevance": pl.Int64}
    ).write_csv(judgments)
    return catalog, judgments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offline.sample_catalog", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("examples"), help="folder for catalog.csv, judgments.csv")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    catalog, judgments = write(args.out, args.seed)
    print(f"wrote {catalog} and {judgments}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
