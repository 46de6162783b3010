import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RuleAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RULE_ACTION_UNSPECIFIED: _ClassVar[RuleAction]
    RULE_ACTION_PIN: _ClassVar[RuleAction]
    RULE_ACTION_EXCLUDE: _ClassVar[RuleAction]
    RULE_ACTION_BOOST: _ClassVar[RuleAction]
    RULE_ACTION_BURY: _ClassVar[RuleAction]

class DiversityMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIVERSITY_METHOD_UNSPECIFIED: _ClassVar[DiversityMethod]
    DIVERSITY_METHOD_NONE: _ClassVar[DiversityMethod]
    DIVERSITY_METHOD_MMR: _ClassVar[DiversityMethod]
    DIVERSITY_METHOD_DPP: _ClassVar[DiversityMethod]
    DIVERSITY_METHOD_MAX_SUM: _ClassVar[DiversityMethod]

class Personalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERSONALIZATION_UNSPECIFIED: _ClassVar[Personalization]
    PERSONALIZATION_NONE: _ClassVar[Personalization]
    PERSONALIZATION_APPLIED: _ClassVar[Personalization]
    PERSONALIZATION_COLD_START: _ClassVar[Personalization]
    PERSONALIZATION_UNAVAILABLE: _ClassVar[Personalization]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
    EVENT_TYPE_SEARCH: _ClassVar[EventType]
RULE_ACTION_UNSPECIFIED: RuleAction
RULE_ACTION_PIN: RuleAction
RULE_ACTION_EXCLUDE: RuleAction
RULE_ACTION_BOOST: RuleAction
RULE_ACTION_BURY: RuleAction
DIVERSITY_METHOD_UNSPECIFIED: DiversityMethod
DIVERSITY_METHOD_NONE: DiversityMethod
DIVERSITY_METHOD_MMR: DiversityMethod
DIVERSITY_METHOD_DPP: DiversityMethod
DIVERSITY_METHOD_MAX_SUM: DiversityMethod
PERSONALIZATION_UNSPECIFIED: Personalization
PERSONALIZATION_NONE: Personalization
PERSONALIZATION_APPLIED: Personalization
PERSONALIZATION_COLD_START: Personalization
PERSONALIZATION_UNAVAILABLE: Personalization
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType
EVENT_TYPE_SEARCH: EventType

class RankRequest(_message.Message):
    __slots__ = ("request_id", "query", "user_id", "candidate_ids", "top_k", "filters", "blend", "diversity", "rules", "exclude_purchased")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    BLEND_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PURCHASED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    query: str
    user_id: str
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    filters: Filters
    blend: BlendOverrides
    diversity: DiversityOptions
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    exclude_purchased: bool
    def __init__(self, request_id: _Optional[str] = ..., query: _Optional[str] = ..., user_id: _Optional[str] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., blend: _Optional[_Union[BlendOverrides, _Mapping]] = ..., diversity: _Optional[_Union[DiversityOptions, _Mapping]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., exclude_purchased: _Optional[bool] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("categories", "min_price", "max_price", "in_stock_only")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_ONLY_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedScalarFieldContainer[str]
    min_price: float
    max_price: float
    in_stock_only: bool
    def __init__(self, categories: _Optional[_Iterable[str]] = ..., min_price: _Optional[float] = ..., max_price: _Optional[float] = ..., in_stock_only: _Optional[bool] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("action", "item_ids", "field", "values", "amount", "position")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    action: RuleAction
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    field: str
    values: _containers.RepeatedScalarFieldContainer[str]
    amount: float
    position: int
    def __init__(self, action: _Optional[_Union[RuleAction, str]] = ..., item_ids: _Optional[_Iterable[str]] = ..., field: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., amount: _Optional[float] = ..., position: _Optional[int] = ...) -> None: ...

class BlendOverrides(_message.Message):
    __slots__ = ("weights",)
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.ScalarMap[str, float]
    def __init__(self, weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DiversityOptions(_message.Message):
    __slots__ = ("method", "strength", "max_per_category", "max_per_brand", "window")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_BRAND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    method: DiversityMethod
    strength: float
    max_per_category: int
    max_per_brand: int
    window: int
    def __init__(self, method: _Optional[_Union[DiversityMethod, str]] = ..., strength: _Optional[float] = ..., max_per_category: _Optional[int] = ..., max_per_brand: _Optional[int] = ..., window: _Optional[int] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "items", "release", "timings", "degraded", "degraded_reason", "candidates", "personalization")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    release: ReleaseInfo
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    degraded: bool
    degraded_reason: str
    candidates: int
    personalization: Personalization
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., release: _Optional[_Union[ReleaseInfo, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., candidates: _Optional[int] = ..., personalization: _Optional[_Union[Personalization, str]] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "breakdown", "title", "category", "brand", "price")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    breakdown: _containers.RepeatedCompositeFieldContainer[ScoreComponent]
    title: str
    category: str
    brand: str
    price: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., breakdown: _Optional[_Iterable[_Union[ScoreComponent, _Mapping]]] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., brand: _Optional[str] = ..., price: _Optional[float] = ...) -> None: ...

class ScoreComponent(_message.Message):
    __slots__ = ("name", "raw", "normalized", "weight", "contribution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    raw: float
    normalized: float
    weight: float
    contribution: float
    def __init__(self, name: _Optional[str] = ..., raw: _Optional[float] = ..., normalized: _Optional[float] = ..., weight: _Optional[float] = ..., contribution: _Optional[float] = ...) -> None: ...

class ReleaseInfo(_message.Message):
    __slots__ = ("release_id", "model_versions")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    model_versions: _containers.ScalarMap[str, str]
    def __init__(self, release_id: _Optional[str] = ..., model_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "millis")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MILLIS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    millis: float
    def __init__(self, stage: _Optional[str] = ..., millis: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "type", "timestamp", "query")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    item_id: str
    type: EventType
    timestamp: _timestamp_pb2.Timestamp
    query: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., query: _Optional[str] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("applied", "duplicates", "rejected")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    duplicates: int
    rejected: _containers.RepeatedCompositeFieldContainer[EventRejection]
    def __init__(self, applied: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[EventRejection, _Mapping]]] = ...) -> None: ...

class EventRejection(_message.Message):
    __slots__ = ("index", "event_id", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    event_id: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., event_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class CatalogItem(_message.Message):
    __slots__ = ("item_id", "title", "category", "brand", "price", "popularity", "rating", "margin", "boost", "in_stock", "created_at")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    BOOST_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    category: str
    brand: str
    price: float
    popularity: float
    rating: float
    margin: float
    boost: float
    in_stock: bool
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., brand: _Optional[str] = ..., price: _Optional[float] = ..., popularity: _Optional[float] = ..., rating: _Optional[float] = ..., margin: _Optional[float] = ..., boost: _Optional[float] = ..., in_stock: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CatalogItem]
    def __init__(self, items: _Optional[_Iterable[_Union[CatalogItem, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("inserted", "updated")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    updated: int
    def __init__(self, inserted: _Optional[int] = ..., updated: _Optional[int] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadReleaseRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class LoadReleaseResponse(_message.Message):
    __slots__ = ("previous", "current", "millis")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    MILLIS_FIELD_NUMBER: _ClassVar[int]
    previous: ReleaseInfo
    current: ReleaseInfo
    millis: float
    def __init__(self, previous: _Optional[_Union[ReleaseInfo, _Mapping]] = ..., current: _Optional[_Union[ReleaseInfo, _Mapping]] = ..., millis: _Optional[float] = ...) -> None: ...
